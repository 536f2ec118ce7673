"""Shards on a real S3-compatible server (moto's HTTP server): written by the `shards` CLI, streamed through a
proxy that resets connections mid-body, trained on 2 ranks; the batches and losses must equal a run from
local disk. Wrong bucket, missing credentials and an unreachable endpoint end in one line naming the URL."""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, free_port, metrics_rows, run_cli, run_job
from s3_fixtures import FlakyProxy, make_bucket, s3_env, s3_server  # noqa: F401  (fixture)

CONFIG = REPO / "configs/pretrain/supervised_tiny_cpu.yaml"
SHARDS = ("synthetic:200", "--samples-per-shard", "48", "--seed", "3")


@pytest.fixture(scope="module")
def corpus(s3_server, tmp_path_factory):
    """The same shards written by the CLI to local disk and to s3://corpus/syn; returns (local dir, port)."""
    make_bucket(s3_server, "corpus")
    local = tmp_path_factory.mktemp("local")
    r = run_cli("shards", *SHARDS, "--out", str(local))
    assert r.returncode == 0, r.stderr
    r = run_cli("shards", *SHARDS, "--out", "s3://corpus/syn", env=s3_env(s3_server))
    assert r.returncode == 0, r.stderr
    assert "s3://corpus/syn/train.json" in r.stdout
    return local, int(s3_server.rsplit(":", 1)[1])


def _use_endpoint(monkeypatch, endpoint: str) -> None:
    import s3fs

    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance remembers the endpoint it was made with


def test_cli_wrote_the_same_bytes_to_s3(corpus, s3_server, monkeypatch):
    import fsspec

    local, _ = corpus
    _use_endpoint(monkeypatch, s3_server)
    meta = json.loads((local / "train.json").read_text())
    remote = json.loads(fsspec.open("s3://corpus/syn/train.json", "r").open().read())
    assert remote["shards"] == meta["shards"] and remote["counts"] == meta["counts"] == [48, 48, 48, 48, 8]
    for name in meta["shards"]:
        with fsspec.open(f"s3://corpus/syn/{name}", "rb") as f:
            assert f.read() == (local / name).read_bytes(), name


def _batches(urls: str, workers: int):
    from dataclasses import replace

    from pretrain.config import load_config
    from pretrain.data import build_train_stream
    from pretrain.models import resolve_arch

    cfg = load_config(str(CONFIG))  # the supervised recipe's data settings, on these shards
    stream = build_train_stream(replace(cfg.data, train_urls=urls, workers=workers), 0, 1,
                                img_size=resolve_arch(cfg.model)["img_size"], augment="train", seed=cfg.run.seed,
                                accum=cfg.optim.accum_steps)
    out = []
    for x, y in stream.iter_epoch(0):
        out.append((y.tolist(), hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()))
    return out


def test_stream_survives_dropped_connections(corpus, monkeypatch, caplog):
    """Every other run of 7 responses is reset mid-body: more than s3fs's own 6 tries, so the stream's
    reopen-at-offset has to carry it; labels and pixels of every batch equal those read from local disk."""
    local, port = corpus
    want = _batches(str(local / "train.json"), workers=0)
    proxy = FlakyProxy(port, cut_after=20000, every=2, burst=7)
    _use_endpoint(monkeypatch, proxy.url)
    got = _batches("s3://corpus/syn/train.json", workers=0)
    assert proxy.cuts >= 6, (proxy.cuts, proxy.connections)
    assert any("reopening there" in r.message for r in caplog.records)
    assert len(got) == len(want) == 200 // 8 and got == want
    proxy.close()


def test_errors_name_the_url_and_the_fix(s3_server, monkeypatch, capsys):
    from pretrain.data import read_index
    from pretrain.errors import UserError

    _use_endpoint(monkeypatch, s3_server)
    with pytest.raises(UserError, match=r"'s3://no-such-bucket/x/train\.json': the bucket does not exist at "
                                        r"http://127\.0\.0\.1:\d+; check the bucket name and AWS_ENDPOINT_URL"):
        read_index("s3://no-such-bucket/x/train.json")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(UserError, match=r"'s3://corpus/syn/train\.json': no credentials .* AWS_ACCESS_KEY_ID"):
        read_index("s3://corpus/syn/train.json")
    # nothing listens on the port: botocore's own retries, then one line (bounded: measured ~9 s here)
    _use_endpoint(monkeypatch, f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"'s3://corpus/syn/train\.json': cannot connect to http://127\.0\.0\.1"):
        read_index("s3://corpus/syn/train.json")
    assert time.monotonic() - t0 < 60
    # the CLI: exit status 2, one line, no traceback; writing to a missing bucket does not create it
    r = run_cli("shards", "synthetic:4", "--out", "s3://no-such-bucket/x", env=s3_env(s3_server))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(line) == 1 and "'s3://no-such-bucket/x" in line[0] and "bucket does not exist" in line[0], r.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_from_s3_equals_local(corpus, tmp_path):
    """`vit-pretrain train` on 2 ranks (1 data worker each) from s3 through the dropping proxy, with 64 KiB
    read blocks so that resets also land past a shard's first byte: the logged losses equal a local run's."""
    local, port = corpus
    # a cut run of 12 connections: two readers taking turns still each meet s3fs's 5 tries all cut (5 + 5, and
    # the HEAD of a reopen), so the reopen path runs however the ranks' requests interleave
    proxy = FlakyProxy(port, cut_after=20000, every=2, burst=12)

    def train(urls, name, env):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "pretrain", "train", str(CONFIG), f"data.train_urls={urls}",
               f"run.out_dir={tmp_path}", f"run.name={name}", "optim.max_steps=6", "checkpoint.every_steps=0"]
        p = run_job(cmd, timeout=400, env=dict(os.environ, OMP_NUM_THREADS="1", **env))
        assert p.returncode == 0, p.stderr[-3000:]
        return {s: r["loss"] for s, r in metrics_rows(tmp_path / name).items()}, p.stderr

    want, _ = train(str(local / "train.json"), "local", {})
    got, err = train("s3://corpus/syn/train.json", "s3", {**s3_env(proxy.url),
                                                          "FSSPEC_S3": '{"default_block_size": 65536}'})
    assert proxy.cuts > 0 and "reopening there" in err, (proxy.cuts, err[-2000:])
    assert sorted(got) == list(range(1, 7)) and got == want
    proxy.close()
