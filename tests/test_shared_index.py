"""Start-up at scale: rank 0 reads the shard indexes and every other rank receives them in one broadcast
(pretrain.engine.indexes, pretrain.dist.share). Two real processes on gloo; run as a script, this file is
the worker: it joins through pretrain.dist.setup(), and only rank 0 puts the indexes into its own
`memory://` filesystem, so a rank that read them itself would find nothing. fsspec.open is counted."""
import json
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_port

TRAIN = {"split": "train", "shards": [f"train-{i:06d}.tar" for i in range(1000)],
         "counts": [1000 + i % 7 for i in range(1000)], "bytes": [10**8 + i for i in range(1000)],
         "classes": [f"n{i:08d}" for i in range(1000)]}
VAL = {"split": "val", "shards": ["val-000000.tar"], "counts": [50], "classes": TRAIN["classes"]}
URLS = ["data.train_urls=memory://idx/train.json", "data.val_urls=memory://idx/val.json"]


def worker(mode: str, out: str) -> int:
    """`good`: shared_indexes, then a non-user error on rank 0 (caught); `bad`: rank 0's train index is
    not JSON, and the error ends the job as in `vit-pretrain train`. Short lines on stdout; the indexes
    received go to `out`/rank<r>.json."""
    import dataclasses

    import fsspec

    from pretrain import dist as pdist
    from pretrain.config import load_config
    from pretrain.engine.indexes import shared_indexes
    from pretrain.errors import UserError

    d = pdist.setup()
    opens = []
    real_open = fsspec.open

    def counted_open(url, *args, **kwargs):
        opens.append(url)
        return real_open(url, *args, **kwargs)

    if d.rank == 0:
        with real_open("memory://idx/train.json", "w") as f:
            f.write("{not json" if mode == "bad" else json.dumps(TRAIN, indent=1))
        with real_open("memory://idx/val.json", "w") as f:
            json.dump(VAL, f)
    fsspec.open = counted_open
    cfg = load_config(None, URLS)

    def body() -> int:
        t0 = time.monotonic()
        try:
            got = shared_indexes(cfg)
        except UserError as e:
            print(f"RANK {d.rank} ERROR after {time.monotonic() - t0:.2f}s: {e}", flush=True)
            raise
        with open(f"{out}/rank{d.rank}.json", "w") as f:
            json.dump({k: dataclasses.asdict(v) for k, v in got.items()}, f)
        print(f"RANK {d.rank} OPENS {len(opens)}", flush=True)
        try:
            pdist.broadcast_from_rank0(lambda: 1 // 0)
        except Exception as e:  # noqa: BLE001  what each rank got
            print(f"RANK {d.rank} CRASH {type(e).__name__}: {e}", flush=True)
        pdist.teardown()
        return 0

    try:
        return pdist.run_guarded(body)
    except UserError:
        return 2


def _two_ranks(mode: str, out) -> tuple[dict, list[subprocess.CompletedProcess]]:
    """Both ranks of a 2-process job -> ({rank: {kind: rest of line}}, the processes)."""
    from launch_fixtures import base_env

    port = free_port()
    logs = [(open(out / f"out{r}.txt", "w+"), open(out / f"err{r}.txt", "w+")) for r in range(2)]  # no pipe fills
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(out)], cwd=REPO, text=True, stdout=o, stderr=e,
                              env=base_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r, (o, e) in enumerate(logs)]
    try:
        for p in procs:
            p.wait(timeout=180)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    done = []
    for p, (o, e) in zip(procs, logs):
        o.seek(0)
        e.seek(0)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, o.read(), e.read()))
        o.close()
        e.close()
    lines: dict = {0: {}, 1: {}}
    for p in done:
        for ln in p.stdout.splitlines():
            if ln.startswith("RANK "):
                _, rank, kind, rest = ln.split(" ", 3)
                lines[int(rank)][kind] = rest
    return lines, done


@pytest.mark.slow
def test_only_rank0_reads_and_both_ranks_get_equal_indexes(tmp_path):
    lines, procs = _two_ranks("good", tmp_path)
    assert [p.returncode for p in procs] == [0, 0], [p.stderr[-2000:] for p in procs]
    assert lines[0]["OPENS"] == "2"  # train.json and val.json, by rank 0
    assert lines[1]["OPENS"] == "0"  # rank 1 opened nothing: it has no such files
    got = json.loads((tmp_path / "rank1.json").read_text())
    assert got == json.loads((tmp_path / "rank0.json").read_text())
    assert sorted(got) == ["train", "val"]
    assert got["train"]["shards"][:1] == ["memory://idx/train-000000.tar"] and got["train"]["counts"] == TRAIN["counts"]
    assert got["train"]["sizes"] == TRAIN["bytes"] and got["train"]["classes"] == TRAIN["classes"]
    # an error that is not the user's: rank 0 raises its own, the peer learns what it was
    assert lines[0]["CRASH"] == "ZeroDivisionError: integer division or modulo by zero"
    assert lines[1]["CRASH"] == "RuntimeError: rank 0 failed: ZeroDivisionError: integer division or modulo by zero"


@pytest.mark.slow
def test_bad_index_on_rank0_ends_every_rank_with_its_message_fast(tmp_path):
    t0 = time.monotonic()
    lines, procs = _two_ranks("bad", tmp_path)
    took = time.monotonic() - t0
    want = "config key data.train_urls: shard index 'memory://idx/train.json' is not valid JSON"
    for rank in (0, 1):
        after, msg = lines[rank]["ERROR"].split(": ", 1)
        assert msg.startswith(want), (rank, msg)
        assert float(after.split()[1].rstrip("s")) < 5.0, after  # not a collective timeout
    assert lines[0]["ERROR"].split(": ", 1)[1] == lines[1]["ERROR"].split(": ", 1)[1]
    # the rank whose report reached the store first exits 2 (the user's error), the other 3 (a peer's)
    assert sorted(p.returncode for p in procs) == [2, 3], [p.stderr[-2000:] for p in procs]
    assert took < 90, took


def test_one_process_reads_directly_and_errors_name_the_key(tmp_path):
    from pretrain.config import load_config
    from pretrain.data.writer import write_shards
    from pretrain.engine.indexes import shared_indexes
    from pretrain.errors import UserError

    made = write_shards("synthetic:30", str(tmp_path), samples_per_shard=10)["splits"]["train"]
    cfg = load_config(None, [f"data.train_urls={tmp_path}/train-*.tar"])  # counts from the folder's index
    got = shared_indexes(cfg)  # no process group: read here
    assert list(got) == ["train"] and got["train"].counts == made["counts"]
    assert shared_indexes(cfg, train=False) == {}
    with pytest.raises(UserError, match=r"^config key data.val_urls: shard index not found"):
        shared_indexes(load_config(None, [f"data.train_urls={tmp_path}/train-*.tar",
                                          f"data.val_urls={tmp_path}/absent/val.json"]))


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2]))
