"""Shards that break under a running job: one cut in the middle of a member, and a server that accepts the
connection and never answers. Real 1-process runs through the CLI on real shards (docs/reliability.md)."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, metrics_rows
from launch_fixtures import base_env

pytestmark = pytest.mark.slow
CONFIG = REPO / "configs/pretrain/supervised_tiny_cpu.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pretrain.data.writer import write_shards

    out = tmp_path_factory.mktemp("data-fault-shards")
    write_shards("synthetic:400", str(out), samples_per_shard=16, val_fraction=0.2)
    return out


def _train(shards_index: str, out: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pretrain", "train", str(CONFIG), f"data.train_urls={shards_index}",
           f"run.out_dir={out}", "run.name=run", "checkpoint.every_steps=0", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=base_env(**(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"no step {step} after {timeout}s"
        time.sleep(0.1)


def _read_late(shards: Path) -> str:
    """The shard that one process of this config reads last in epoch 0 (so it can be cut once the run is
    under way)."""
    from pretrain.config import load_config
    from pretrain.data.index import read_index
    from pretrain.data.plan import EpochPlan, Layout, seg_points

    cfg = load_config(str(CONFIG), [f"data.train_urls={shards}/train.json"])
    d = cfg.data
    index = read_index(d.train_urls)
    plan = EpochPlan(index.counts, cfg.run.seed, 0, [(Layout(1, d.workers, d.batch_size, d.shuffle_block), 0)])
    layer = plan.layers[0]

    def read(lo: int, hi: int) -> list[int]:
        got = plan.locate(seg_points(layer.slot_segs(0, 0), np.arange(lo, hi)))[0].tolist()
        return list(dict.fromkeys(got))  # in reading order

    order = read(0, layer.slot(0, 0)[1] * d.batch_size)
    assert order[-1] not in read(0, 2 * d.shuffle_block), "the last shard is read in the first blocks"
    return Path(index.shards[order[-1]]).name


def _cut_mid_member(path: Path) -> int:
    """Cut a tar in the middle of the data of its 26th member (the 13th sample's second file, of 16);
    -> the new length in bytes."""
    import tarfile

    with tarfile.open(path) as tar:
        member = tar.getmembers()[25]
    cut = member.offset_data + member.size // 2
    with open(path, "r+b") as f:
        f.truncate(cut)
    return cut


@pytest.mark.parametrize("limit", ["default", "zero"])
def test_shard_truncated_mid_run(shards, tmp_path, limit):
    """Cut samples are skipped and counted under data.max_bad_fraction (the default tolerates the few of
    one shard, and says which shard broke where); a limit of 0 ends the job with exit 2 and one line."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    doomed = _read_late(copy)
    # one epoch: 320 samples in batches of 8
    overrides = ["optim.max_steps=40"] + (["data.max_bad_fraction=0"] if limit == "zero" else [])
    proc = _train(f"{copy}/train.json", tmp_path, *overrides)
    try:
        _wait_step(proc, tmp_path / "run", 1)
        cut = _cut_mid_member(copy / doomed)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    broke = [ln for ln in out.splitlines() if "is truncated or corrupt" in ln]
    assert broke and doomed in broke[0] and "unexpected end of data" in broke[0], out[-3000:]
    assert "sample #12" in broke[0] and "at byte " in broke[0], broke[0]
    print(f"exit {proc.returncode}, cut at byte {cut}", broke[0], sep="\n  ")  # docs/reliability.md
    if limit == "default":
        assert proc.returncode == 0, out[-3000:]
        rows = metrics_rows(tmp_path / "run")
        assert max(rows) == 40
        bad = max(r.get("bad_samples", 0) for r in rows.values())
        assert bad == 16 - 12, bad  # the cut shard's samples from the 13th on, no more
    else:
        assert proc.returncode == 2, out[-3000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith("vit-pretrain train: error: ") and "data.max_bad_fraction=0.0" in last, last
        assert "truncated=" in last and "Traceback" not in out, out[-3000:]
        print(" ", last)


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers (a hung object store or HTTP proxy)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.first: float | None = None  # when the first connection came (time.monotonic)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.first = self.first or time.monotonic()
            self.conns.append(conn)

    def close(self) -> None:
        for c in [self.sock, *self.conns]:
            c.close()


def test_shard_url_that_never_answers_ends_the_job_naming_it(shards, tmp_path):
    server = SilentServer()
    index = json.loads((shards / "train.json").read_text())
    index["shards"] = [f"http://127.0.0.1:{server.port}/{Path(s).name}" for s in index["shards"]]
    (tmp_path / "http.json").write_text(json.dumps(index))
    timeout_s = 2
    proc = _train(str(tmp_path / "http.json"), tmp_path, "optim.max_steps=2",
                  env={"VIT_PRETRAIN_IO_TIMEOUT": str(timeout_s)})
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
    ended = time.monotonic()
    assert server.conns, "the job never connected"
    seconds = ended - server.first
    assert proc.returncode == 2, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("vit-pretrain train: error: shard unreachable after 4 tries: "
                           f"'http://127.0.0.1:{server.port}/train-"), last
    assert "Timeout" in last and f"VIT_PRETRAIN_IO_TIMEOUT={timeout_s}" in last, last
    assert "Traceback" not in out, out[-3000:]
    # 4 tries of two requests (HEAD, then GET) of 2 s each and 3.5 s of backoff: 19.5 s, and the exit
    assert 4 * 2 * timeout_s <= seconds < 60, seconds
    print(f"exit 2 {seconds:.1f}s after the first connection, {len(server.conns)} connections", last,
          sep="\n  ")  # docs/reliability.md
