"""The engine through its real launch paths: 2 processes under torchrun (ZeRO 2 and 3, gloo), a 2-process
checkpoint resumed on 1 process (universal checkpoint), and the `vit-pretrain train` CLI's exit codes.
Run as a script, this file is the torchrun worker."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, metrics_rows, run_cli, run_job

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"supervised": REPO / "configs/pretrain/supervised_tiny_cpu.yaml",
           "mae": REPO / "configs/pretrain/mae_tiny_cpu.yaml"}
pytestmark = pytest.mark.slow


def worker(config: str, overrides: list[str]) -> None:
    """Train, then write a digest of the full parameters seen by this rank."""
    import threading

    import torch
    from pretrain import dist as pdist
    from pretrain.config import load_config
    from pretrain.engine.trainer import Trainer

    cfg = load_config(config, overrides)
    env = pdist.setup()
    trainer = Trainer(cfg, env, threading.Event())
    trainer.fit()
    params = list(trainer.module.parameters())
    if trainer.zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    with ctx:
        flat = torch.cat([p.detach().float().flatten() for p in params])
        digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
        out = {"digest": digest, "numel": flat.numel(), "abs_sum": flat.abs().sum().item()}
    Path(trainer.run_dir, f"params_rank{env.rank}.json").write_text(json.dumps(out))
    pdist.teardown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pretrain.data.writer import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards("synthetic:200", str(out), samples_per_shard=48, val_fraction=0.2)
    return out




STEPS = {"supervised": 20, "mae": 10}  # a tiny classifier needs ~20 steps before its loss clearly falls


def _torchrun(kind, stage, shards, out):
    steps = STEPS[kind]
    overrides = [f"data.train_urls={shards}/train.json", f"run.out_dir={out}", f"run.name={kind}{stage}",
                 f"deepspeed.zero_stage={stage}", f"optim.max_steps={steps}", "checkpoint.every_steps=5"]
    if kind == "supervised":  # top-1/top-5 on validation shards, the ranks holding unequal batch counts
        overrides += [f"data.val_urls={shards}/val.json", "eval.every_steps=5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), __file__, str(CONFIGS[kind]), *overrides]
    proc = run_job(cmd, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(out) / f"{kind}{stage}"


@pytest.fixture(scope="module")
def two_proc_runs(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return {(kind, stage): _torchrun(kind, stage, shards, out) for kind, stage in RUNS}


RUNS = [("supervised", 2), ("mae", 3), ("supervised", 3)]


@pytest.mark.parametrize("kind,stage", RUNS)
def test_two_processes_identical_params_and_loss_goes_down(two_proc_runs, kind, stage):
    run = two_proc_runs[(kind, stage)]
    p0 = json.loads((run / "params_rank0.json").read_text())
    p1 = json.loads((run / "params_rank1.json").read_text())
    assert p0 == p1 and p0["numel"] > 0
    rows = metrics_rows(run)
    n = STEPS[kind]
    assert sorted(rows) == list(range(1, n + 1))
    assert rows[n]["samples"] == n * 2 * 8  # micro 8 x 2 ranks
    derived = json.loads((run / "derived.json").read_text())
    assert derived["world_size"] == 2 and derived["zero_stage"] == stage and derived["effective_batch"] == 16
    first = sum(rows[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(rows[s]["loss"] for s in (n - 2, n - 1, n)) / 3
    assert last < first, (first, last)
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{n:08d}"
    if kind == "supervised":
        val = [json.loads(line) for line in open(run / "metrics.jsonl") if "val/top1" in line]
        assert [v["step"] for v in val] == list(range(5, n + 1, 5)) and all(v["val/n"] == 40 for v in val)
        assert all(0 <= v["val/top1"] <= v["val/top5"] <= 1 for v in val)


@pytest.mark.parametrize("kind,stage", [("supervised", 2), ("mae", 3)])
def test_two_process_checkpoint_resumes_on_one_process(two_proc_runs, shards, kind, stage):
    run, n = two_proc_runs[(kind, stage)], STEPS[kind]
    proc = run_cli("train", str(CONFIGS[kind]), f"data.train_urls={shards}/train.json",
                   f"run.out_dir={run.parent}", f"run.name={run.name}", f"deepspeed.zero_stage={stage}",
                   f"optim.max_steps={n + 3}", "checkpoint.every_steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and f"step_{n:08d}_universal" in proc.stderr
    rows = metrics_rows(run)
    assert sorted(rows) == list(range(1, n + 4))
    assert rows[n + 3]["samples"] == n * 16 + 3 * 8  # the new world size's batches after the resume
    assert all(rows[s]["loss"] is not None and rows[s]["loss"] < rows[1]["loss"] * 1.5 for s in range(n + 1, n + 4))
    assert json.loads((run / "derived.json").read_text())["world_size"] == 1
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{n + 3:08d}"


def _universal_state(ckpt: Path) -> dict:
    """{param/name: tensor} of DeepSpeed's universal form of `ckpt` (fp32 weights, Adam's moments)."""
    import torch

    out = ckpt.parent / f"{ckpt.name}_check"
    if not out.exists():
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(ckpt), "--output_folder", str(out), "--num_extract_workers", "1",
                               "--num_merge_workers", "1", "--inject_missing_state"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    def tensor(f):  # a bare tensor, or (some DeepSpeed versions) a dict holding it as "param"
        x = torch.load(f, weights_only=True)
        return x["param"] if isinstance(x, dict) else x

    return {f"{f.parent.name}/{f.stem}": tensor(f)
            for f in sorted((out / "zero").glob("*/*.pt")) if f.stem in ("fp32", "exp_avg", "exp_avg_sq")}


def test_world_size_change_resume_carries_weights_optimizer_and_schedule(two_proc_runs, shards, tmp_path):
    """A 2-process ZeRO-3 checkpoint resumed on 1 process: right after the load, the consolidated weights
    and Adam's moments equal the checkpoint's, and the schedule keeps its place in images seen while the
    peak lr follows the halved effective batch."""
    import torch

    from pretrain.engine.consolidate import consolidate

    run, n = two_proc_runs[("supervised", 3)], STEPS["supervised"]
    tag = f"step_{n:08d}"
    proc = run_cli("train", str(CONFIGS["supervised"]), f"data.train_urls={shards}/train.json",
                   f"run.out_dir={tmp_path}", "run.name=one", "deepspeed.zero_stage=3", f"optim.max_steps={n}",
                   f"checkpoint.resume={run}/checkpoints/{tag}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/{tag}_universal at step {n}" in proc.stderr, proc.stderr[-3000:]
    assert "effective batch 16 -> 8 on resume" in proc.stderr
    one = tmp_path / "one"
    assert (one / "checkpoints/latest").read_text().strip() == tag  # saved here, untrained since the load
    a, _ = consolidate(str(run), tag)
    b, _ = consolidate(str(one), tag)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ua, ub = _universal_state(run / "checkpoints" / tag), _universal_state(one / "checkpoints" / tag)
    assert sorted(ua) == sorted(ub) and any(k.endswith("/exp_avg_sq") for k in ua)
    differ = [k for k in ua if not torch.equal(ua[k], ub[k])]
    assert not differ, differ[:5]
    before, after = (json.loads((r / "derived.json").read_text()) for r in (run, one))
    assert after["peak_lr"] == pytest.approx(before["peak_lr"] / 2)
    assert (after["warmup_samples"], after["schedule_samples"]) == (before["warmup_samples"],
                                                                    before["schedule_samples"])


def test_one_process_checkpoint_resumes_on_two_processes(shards, tmp_path):
    common = [f"data.train_urls={shards}/train.json", f"run.out_dir={tmp_path}", "run.name=grow",
              "checkpoint.every_steps=4"]
    one = run_cli("train", str(CONFIGS["mae"]), *common, "optim.max_steps=3")
    assert one.returncode == 0, one.stderr[-3000:]
    # 160 samples, 20 steps of 8 per epoch: 3 done leave 136, 8.5 steps of 2 x 8: 8 padded samples, in the
    # last step or two (wherever the last block's shuffle puts them)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), __file__, str(CONFIGS["mae"]), *common, "optim.max_steps=13"]
    two = run_job(cmd, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "step_00000003_universal at step 3" in two.stderr
    assert re.search(r"its last [12] step\(s\) are ragged, 8 padded samples weigh 0", two.stderr), two.stderr[-3000:]
    run = tmp_path / "grow"
    assert json.loads((run / "params_rank0.json").read_text()) == json.loads((run / "params_rank1.json").read_text())
    rows = metrics_rows(run)
    assert sorted(rows) == list(range(1, 14)) and rows[13]["samples"] == 3 * 8 + 10 * 16
    assert rows[13]["epoch"] == 1  # step 13 is the next epoch's first, from a fresh 2-rank layout


def test_cli_sigterm_checkpoints_and_exits_75_then_resumes(shards, tmp_path):
    args = [sys.executable, "-m", "pretrain", "train", str(CONFIGS["supervised"]),
            f"data.train_urls={shards}/train.json", f"run.out_dir={tmp_path}", "run.name=pre",
            "optim.max_steps=100000", "checkpoint.every_steps=0"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "pre/metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    latest = (tmp_path / "pre/checkpoints/latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert step >= 3
    again = run_cli("train", str(CONFIGS["supervised"]), f"data.train_urls={shards}/train.json",
                    f"run.out_dir={tmp_path}", "run.name=pre", f"optim.max_steps={step + 2}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {tmp_path}/pre/checkpoints/{latest} at step {step}" in again.stderr
    assert max(metrics_rows(tmp_path / "pre")) == step + 2


def test_cli_user_errors_exit_2(shards, tmp_path):
    bad = run_cli("train", str(CONFIGS["mae"]), f"data.train_urls={tmp_path}/none-*.tar", f"run.out_dir={tmp_path}")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    resume = run_cli("train", str(CONFIGS["mae"]), f"data.train_urls={shards}/train.json", f"run.out_dir={tmp_path}",
                     f"checkpoint.resume={tmp_path}/nowhere")
    assert resume.returncode == 2 and "checkpoint.resume" in resume.stderr


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
