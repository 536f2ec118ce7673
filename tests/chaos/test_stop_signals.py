"""SIGTERM twice (a pre-emption notice and an impatient second one, or SLURM's TERM after scancel's): the
job checkpoints once, exits 75 (requeue), and the checkpoint resumes; the second TERM, sent while the
checkpoint is being written, neither kills the process nor leaves a half-published checkpoint, and nor
does a third sent while the process leaves. A real
1-process run through the CLI on real shards; the signals go to the whole process group, data workers
included, as SLURM sends them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import REPO, metrics_rows
from launch_fixtures import base_env

pytestmark = pytest.mark.slow
CONFIG = REPO / "configs/pretrain/supervised_tiny_cpu.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pretrain.data.writer import write_shards

    out = tmp_path_factory.mktemp("stop-shards")
    write_shards("synthetic:200", str(out), samples_per_shard=16, val_fraction=0.2)
    return out


def _cmd(shards, out, *overrides):
    return [sys.executable, "-m", "pretrain", "train", str(CONFIG), f"data.train_urls={shards}/train.json",
            f"run.out_dir={out}", "run.name=run", "checkpoint.every_steps=0", *overrides]


def test_sigterm_twice_checkpoints_once_exits_75_and_resumes(shards, tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    proc = subprocess.Popen(_cmd(shards, tmp_path, "optim.max_steps=100000"), cwd=REPO, env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        # the second TERM as soon as the checkpoint's temporary folder shows (the write under way)
        during_write = False
        while proc.poll() is None and time.monotonic() < sent + 60:
            if ck.exists() and any(".tmp-" in p.name for p in ck.iterdir()):
                during_write = not (ck / "latest").exists()
                break
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGTERM)
        # and a third once the checkpoint is out and the process is leaving (handlers must still be there)
        while proc.poll() is None and not any("exiting with 75" in ln for ln in lines):
            assert time.monotonic() < sent + 120, "".join(lines)[-3000:]
            time.sleep(0.002)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
        reader.join(timeout=10)
        out = "".join(lines)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 75, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    tags = sorted(p.name for p in ck.iterdir())
    latest = (ck / "latest").read_text().strip()
    assert [t for t in tags if t.startswith("step_")] == [latest], tags  # one checkpoint, nothing left aside
    assert f"stop signal: checkpointed step {int(latest[5:])}; exiting with 75" in out, out[-3000:]
    module = torch.load(ck / latest / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and all(torch.isfinite(v).all() for v in module.values())
    print(f"exit 75 after {seconds:.1f}s, checkpoint {latest}, "
          f"second TERM during the write: {during_write}")  # docs/reliability.md
    # the checkpoint resumes where the stop left it and trains on
    stopped_at = int(latest[5:])
    again = subprocess.run(_cmd(shards, tmp_path, f"optim.max_steps={stopped_at + 2}"), cwd=REPO, env=base_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ck}/{latest} at step {stopped_at}" in again.stderr, again.stderr[-3000:]
    assert max(metrics_rows(run)) == stopped_at + 2
