"""A fault on one rank of a 2-process job (torchrun or a plain launch) ends every process within a bound,
with a non-zero exit and the failing rank's message (docs/reliability.md). Real shards, the real CLI, gloo."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from conftest import REPO, free_port
from launch_fixtures import base_env

pytestmark = pytest.mark.slow
CONFIG = REPO / "configs/pretrain/supervised_tiny_cpu.yaml"
BOUND_S = 60.0  # every process gone within this long after the fault (the promise in DESIGN.md)
HEARTBEAT_S = 10  # the tests' $VIT_PRETRAIN_HEARTBEAT_TIMEOUT (default 45)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pretrain.data.writer import write_shards

    out = tmp_path_factory.mktemp("chaos-shards")
    write_shards("synthetic:400", str(out), samples_per_shard=16, val_fraction=0.2)
    return out


class Job:
    """A 2-rank `vit-pretrain train` job, its output read line by line with timestamps. `launcher`:
    `torchrun` (which ends the other workers when one exits) or `plain` (two processes given RANK,
    WORLD_SIZE, MASTER_ADDR, ... by hand, as srun and the deepspeed launcher do: nothing but our own
    watchdog ends a rank)."""

    def __init__(self, tmp_path: Path, shards: Path, *overrides: str, env: dict | None = None,
                 launcher: str = "torchrun"):
        self.run_dir, self.launcher = tmp_path / "run", launcher
        train = ["-m", "pretrain", "train", str(CONFIG), f"data.train_urls={shards}/train.json",
                 f"run.out_dir={tmp_path}", "run.name=run", "optim.max_steps=100000", "checkpoint.every_steps=0",
                 *overrides]
        full_env = base_env(VIT_PRETRAIN_HEARTBEAT_TIMEOUT=str(HEARTBEAT_S), **(env or {}))
        port = str(free_port())
        if launcher == "torchrun":
            cmds = [([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                      *train], full_env)]
        else:
            cmds = [([sys.executable, *train], dict(full_env, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                                    LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                    for r in (0, 1)]
        self.procs = [subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, start_new_session=True) for cmd, e in cmds]
        self.lines: list[tuple[float, str]] = []
        self.workers: dict[int, psutil.Process] = {}
        if launcher == "plain":
            self.workers = {r: psutil.Process(p.pid) for r, p in enumerate(self.procs)}
        for p in self.procs:
            threading.Thread(target=self._read, args=(p,), daemon=True).start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append((time.monotonic(), line))

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    @property
    def returncodes(self) -> list[int | None]:
        return [p.returncode for p in self.procs]

    def wait_step(self, step: int, timeout: float = 300) -> None:
        """Until rank 0 logged `step` (metrics.jsonl); also learns torchrun's workers' pids by their RANK."""
        metrics = self.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
            assert all(p.poll() is None for p in self.procs), f"job ended before step {step}:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no step {step} after {timeout}s:\n{self.output[-3000:]}"
            time.sleep(0.2)
        if not self.workers:
            for child in psutil.Process(self.procs[0].pid).children():
                self.workers[int(child.environ()["RANK"])] = child

    def wait_line(self, text: str, timeout: float = 120) -> float:
        """Until a line holding `text` appears; -> when it did."""
        deadline = time.monotonic() + timeout
        while not (found := [t for t, line in list(self.lines) if text in line]):
            assert time.monotonic() < deadline, f"{text!r} not in the output:\n{self.output[-3000:]}"
            time.sleep(0.1)
        return found[0]

    def wait_all(self, since: float, bound: float = BOUND_S) -> float:
        """Seconds from `since` until the launcher and both workers are gone; fails past `bound`.
        Whatever is left afterwards is killed."""
        deadline = since + bound
        procs = [psutil.Process(self.procs[0].pid)] if self.launcher == "torchrun" else []
        procs += list(self.workers.values())
        try:
            while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs):
                if time.monotonic() > deadline:
                    raise AssertionError(f"still running {bound:.0f}s after the fault:\n{self.output[-3000:]}")
                time.sleep(0.1)
            return time.monotonic() - since
        finally:
            for p in [*self.procs]:
                if p.poll() is None:
                    p.kill()
            for w in self.workers.values():
                try:
                    w.kill()
                except psutil.NoSuchProcess:
                    pass
            for p in self.procs:
                p.wait(timeout=30)


def _assert_failed(job: Job, seconds: float, *messages: str) -> None:
    out = job.output
    assert all(rc not in (0, None) for rc in job.returncodes), (job.returncodes, out[-3000:])
    for m in messages:
        assert m in out, f"{m!r} not in the output:\n{out[-3000:]}"
    said = [line.strip() for line in out.splitlines() if line.startswith("vit-pretrain: rank")]
    print(f"exit {job.returncodes} after {seconds:.1f}s", *said, sep="\n  ")  # docs/reliability.md


@pytest.mark.parametrize("where,launcher", [("step", "torchrun"), ("eval", "torchrun"), ("save", "torchrun"),
                                            ("step", "plain")])
def test_exception_on_one_rank_ends_the_job(shards, tmp_path, where, launcher):
    extra = {"step": [], "eval": [f"data.val_urls={shards}/val.json", "eval.every_steps=3"],
             "save": ["checkpoint.every_steps=3"]}[where]
    job = Job(tmp_path, shards, *extra, env={"VIT_PRETRAIN_FAULT": f"1:3:{where}"}, launcher=launcher)
    job.wait_step(1)
    failed = job.wait_line("rank 1/2")  # printed at once, before any cleanup
    seconds = job.wait_all(failed)
    _assert_failed(job, seconds, f"rank 1 failed: RuntimeError: injected fault (VIT_PRETRAIN_FAULT=1:3:{where})",
                   "rank 0/2", "stopped because rank 1 failed")


def _shards_only_rank1_reads_late(shards: Path) -> list[str]:
    """Shards that, in epoch 0 of this config on 2 ranks, rank 1 reads after its first shuffle block and
    rank 0 never reads: deleting them fails rank 1 alone, some steps into the run."""
    from pretrain.config import load_config
    from pretrain.data.index import read_index
    from pretrain.data.plan import EpochPlan, Layout, seg_points

    cfg = load_config(str(CONFIG), [f"data.train_urls={shards}/train.json"])
    d = cfg.data
    index = read_index(d.train_urls)
    layer = (plan := EpochPlan(index.counts, cfg.run.seed, 0,
                               [(Layout(2, d.workers, d.batch_size, d.shuffle_block), 0)])).layers[0]

    def read_by(rank: int, lo: int = 0, hi: int | None = None) -> set[int]:
        hi = layer.slot(rank, 0)[1] * d.batch_size if hi is None else hi
        return set(plan.locate(seg_points(layer.slot_segs(rank, 0), np.arange(lo, hi)))[0].tolist())

    late = read_by(1) - read_by(0) - read_by(1, 0, d.shuffle_block)
    assert late, "the test's shard layout gives rank 1 no shard of its own"
    return [Path(index.shards[i]).name for i in sorted(late)]


def test_shard_deleted_mid_run_on_one_rank_ends_the_job(shards, tmp_path):
    doomed = _shards_only_rank1_reads_late(shards)
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    job = Job(tmp_path, copy)
    job.wait_step(1)
    for name in doomed:
        (copy / name).unlink()
    failed = job.wait_line("rank 1/2", timeout=300)
    seconds = job.wait_all(failed)
    _assert_failed(job, seconds, "rank 1 failed: UserError: shard unreachable", "stopped because rank 1 failed")
    assert any(name in job.output for name in doomed), job.output[-3000:]


@pytest.mark.parametrize("launcher", ["torchrun", "plain"])
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_dead_or_hung_peer_ends_the_job(shards, tmp_path, sig, launcher):
    job = Job(tmp_path, shards, launcher=launcher)
    job.wait_step(2)
    sent = time.monotonic()
    job.workers[1].send_signal(getattr(signal, sig))
    # a stopped process cannot end itself: its neighbour (rank 0, on the same host) kills it
    seconds = job.wait_all(sent)
    messages = ["rank 0/2"] + (["rank 1 failed: no heartbeat"] if sig == "SIGSTOP" else [])
    _assert_failed(job, seconds, *messages)


@pytest.fixture
def small_disk(tmp_path):
    """A 600 KiB tmpfs: room for the run's files and one checkpoint of the tiny model (~350 KiB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("the disk-full test mounts a tmpfs: it needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_during_a_save_ends_the_job_and_keeps_the_last_checkpoint(shards, small_disk, tmp_path):
    job = Job(small_disk, shards, "checkpoint.every_steps=2", "checkpoint.keep=3")
    job.wait_step(1)
    failed = job.wait_line(" failed: ", timeout=400)
    seconds = job.wait_all(failed)
    _assert_failed(job, seconds, "stopped because rank")
    ck = small_disk / "run/checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002", job.output[-3000:]
    # the last published checkpoint is whole: another run resumes from it (a copy on a disk with room:
    # one process converts the 2-rank checkpoint to the universal format next to it)
    copy = tmp_path / "copy"
    shutil.copytree(ck, copy)
    again = subprocess.run([sys.executable, "-m", "pretrain", "train", str(CONFIG), f"data.train_urls={shards}/train.json",
                            f"run.out_dir={tmp_path}", "run.name=again", f"checkpoint.resume={copy}/step_00000002",
                            "optim.max_steps=3"], cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "at step 2" in again.stderr, again.stderr[-3000:]


def test_nan_loss_on_one_rank_is_skipped_then_stops_the_job(shards, tmp_path):
    """A NaN loss on rank 1 alone: the step is skipped on every rank with a warning naming step, rank and
    value; a run of `optim.max_nonfinite_steps` such steps ends the job, and no checkpoint holds NaN."""
    job = Job(tmp_path, shards, "checkpoint.every_steps=2", "checkpoint.keep=5", "optim.max_nonfinite_steps=3",
              env={"VIT_PRETRAIN_FAULT": "1:3:nan,1:6-:nan"}, launcher="plain")
    job.wait_step(1)
    failed = job.wait_line("consecutive steps with a non-finite loss")
    seconds = job.wait_all(failed)
    # said at the logging step after the skip (every step here): the guard reads no device value in between
    _assert_failed(job, seconds, "warning: 1 step(s) skipped (no update), the last at step 3: non-finite loss on "
                   "rank 1 (nan); 1 in a row",
                   "warning: 1 step(s) skipped (no update), the last at step 7: non-finite loss on rank 1 (nan); "
                   "2 in a row",
                   "3 consecutive steps with a non-finite loss or gradient norm, the last at step 8: "
                   "non-finite loss on rank 1 (nan); no update was applied, last good checkpoint: ")
    assert "the last at step 4" not in job.output and "skipped (no update), the last at step 8" not in job.output
    ck = job.run_dir / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000006"
    # the newest checkpoint (written after the skipped step 6) loads: exported, its weights are finite
    export = subprocess.run([sys.executable, "-m", "pretrain", "export", str(job.run_dir), "--out",
                             str(tmp_path / "w.safetensors")], cwd=REPO, env=base_env(), capture_output=True,
                            text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-3000:]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "w.safetensors")
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
