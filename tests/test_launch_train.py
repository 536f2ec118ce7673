"""The repo's launch scripts running real `vit-pretrain train` jobs on 2 "nodes" of this machine:
launch/slurm/train.sbatch on a real SLURM cluster (to completion; pre-empted, requeued and resumed),
launch/deepspeed.sh with a 2-host hostfile over pdsh/ssh, launch/torchrun.sh as two nodes.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port
from launch_fixtures import base_env  # fixtures slurm_cluster, ssh_loopback: session-wide, via conftest.py

pytestmark = pytest.mark.slow
TIMES: dict = {}
TINY = """\
run: {name: tiny}
model: {arch: vit_nano_patch4_16}
task: {kind: supervised}
data: {batch_size: 8, workers: 1, shuffle_block: 64, crop_scale: [0.5, 1.0]}
optim: {max_steps: 6, lr_per_256: 0.1, warmup_steps: 2}
checkpoint: {every_steps: 3, keep: 2}
logging: {every_steps: 1, progress: false, images_every_steps: 0}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny synthetic shards shared by every launch test."""
    from pretrain.data.writer import write_shards

    d = tmp_path_factory.mktemp("launch_train")
    write_shards("synthetic:128", str(d / "shards"), samples_per_shard=32)
    # the tiny CPU experiment, self-contained (no _base_): these tests check launching, not config files
    (d / "tiny.yaml").write_text(TINY)
    return d


def _steps(run_dir: Path) -> list[int]:
    """Every logged training step, in order, duplicates kept (a step trained twice shows twice)."""
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _ranks_agree(run_dir: Path, world: int) -> None:
    """ZeRO-2: rank 0 saved the full module, each rank its own fp32 partition of it. The partitions of
    all ranks, put together, must equal rank 0's parameters: every rank holds the same model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    parts = sorted((ckpt / tag).glob("*optim_states.pt"))
    assert len(parts) == world, parts  # one optimizer partition per rank
    merged = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag)
    module = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert merged.keys() and set(merged) <= set(module)
    for k, v in merged.items():
        assert torch.equal(v, module[k].float()), k


CPU_JOB = ("--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1")  # as on a cluster without GPUs
GPU_JOB = ("--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=2")  # the script's GPU lines, small


def _sbatch(cluster, work: Path, name: str, *overrides: str, env: dict | None = None,
            shape: tuple = CPU_JOB) -> str:
    cluster.env.update({"PYTHON": sys.executable, "OUT_DIR": str(work / "runs"), "RUN_NAME": name, **(env or {})})
    r = cluster.run("sbatch", "--parsable", "--nodes=2", *shape, f"--job-name={name}", f"--chdir={REPO}",
                    f"--output={work}/%x-%j.out", str(REPO / "launch/slurm/train.sbatch"), str(work / "tiny.yaml"),
                    f"data.train_urls={work}/shards/train.json", "data.workers=1", *overrides)
    return r.stdout.strip().split(";")[0]


def test_slurm_pretrain_then_dependent_finetune(slurm_cluster, work):
    """launch/slurm/pretrain_then_finetune.sh: 2-node pretraining to completion, then the dependent
    fine-tune job exports it and trains from it."""
    t0 = time.monotonic()
    slurm_cluster.env.update(PYTHON=sys.executable, OUT_DIR=str(work / "runs"), PT_NAME="full",
                             SBATCH_ARGS=f"--chdir={REPO} --output={work}/%x-%j.out {' '.join(CPU_JOB)}")
    data = [f"data.train_urls={work}/shards/train.json", "data.workers=1"]
    cfg = str(work / "tiny.yaml")
    r = slurm_cluster.run("bash", str(REPO / "launch/slurm/pretrain_then_finetune.sh"), cfg, cfg,
                          *data, "optim.max_steps=6", "checkpoint.every_steps=3", "--", *data,
                          "task.kind=finetune", "optim.max_steps=3")
    pt_job, ft_job = (line.split()[2] for line in r.stdout.splitlines()[:2])
    assert slurm_cluster.job(ft_job)["JobState"] == "PENDING"  # waits for pretraining
    info = slurm_cluster.wait_job(pt_job, timeout=400)
    log = (work / f"full-{pt_job}.out").read_text()
    TIMES["slurm sbatch 2 nodes, pretrain 6 steps"] = time.monotonic() - t0
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    run = work / "runs/full"
    assert _steps(run) == list(range(1, 7)), log[-3000:]
    assert json.loads((run / "derived.json").read_text())["world_size"] == 2
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000006"
    _ranks_agree(run, 2)
    assert "master n1:" in log and "trainer exited 0" in log

    ft = slurm_cluster.wait_job(ft_job, timeout=400)
    ft_log = (work / f"full-ft-{ft_job}.out").read_text()
    TIMES["slurm pretrain + dependent finetune (3 steps)"] = time.monotonic() - t0
    assert ft["JobState"] == "COMPLETED", ft_log[-3000:]
    assert (run / "export/full.safetensors").is_file()
    ft_run = work / "runs/full-ft"
    assert _steps(ft_run) == [1, 2, 3] and "finetune" in (ft_run / "config.yaml").read_text()
    assert "full.safetensors" in (ft_run / "config.yaml").read_text()


# srun tasks get the time-limit warning (USR1), a torchrun per node pre-emption's TERM: both launch paths and
# both signals, each once (the trainer answers USR1 and TERM alike: tests/test_engine.py)
@pytest.mark.parametrize("launch,sig", [("srun", "USR1"), ("torchrun", "TERM")])
def test_slurm_preemption_checkpoints_requeues_and_resumes(slurm_cluster, work, launch, sig):
    """LAUNCH=srun: one task per rank; LAUNCH=torchrun: one torchrun per node, the signal reaching its workers.
    USR1 is the warning before the time limit; TERM (to every task: torchrun's agent and its workers) is what
    pre-emption sends. Submitted with GPUs (gres), so the script's GPU lines run."""
    t0 = time.monotonic()
    steps, name = 14, f"pre-{launch}-{sig}"
    # every rank waits after step 4 until the signal has reached it (a fault hook): the signal lands mid-run
    # however fast the steps are, and the stop is voted at step 5 (or 4)
    job = _sbatch(slurm_cluster, work, name, f"optim.max_steps={steps}", "checkpoint.every_steps=0",
                  env={"LAUNCH": launch, "VIT_PRETRAIN_FAULT": "0:4:hold,1:4:hold"}, shape=GPU_JOB)
    metrics = work / f"runs/{name}/metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(_steps(metrics.parent)) >= 3):
        state = slurm_cluster.job(job).get("JobState")
        assert time.monotonic() < deadline and state in ("PENDING", "RUNNING", "CONFIGURING"), \
            (state, (work / f"{name}-{job}.out").read_text()[-3000:])
        time.sleep(0.3)
    # what `#SBATCH --signal=USR1@180` does before the time limit, or pre-emption's TERM: to every task of
    # the job's steps (not to srun itself: srun answers a TERM by killing its tasks, see docs/launching.md)
    slurm_cluster.run("scancel", f"--signal={sig}", job)
    info = slurm_cluster.wait_job(job, timeout=500)
    log = (work / f"{name}-{job}.out").read_text()
    TIMES[f"slurm ({launch}, {sig}) pre-emption + requeue + resume, {steps} steps"] = time.monotonic() - t0
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-4000:])
    assert "trainer exited 75" in log and "requeueing" in log and "restart 1" in log, log[-4000:]
    stopped_at = int(log.split("stop signal: checkpointed step ")[1].split(";")[0]) if "stop signal" in log else None
    got = _steps(metrics.parent)
    assert got == list(range(1, steps + 1)), got  # no step trained twice, none lost
    assert f"resumed from {work}/runs/{name}/checkpoints/step_" in log, log[-4000:]
    assert stopped_at in (4, 5), log[-4000:]  # 4: the signal came before step 3's vote began
    assert (metrics.parent / "checkpoints/latest").read_text().strip() == f"step_{steps:08d}"


PROBE = """\
#!/bin/bash
# PYTHON for train.sbatch: each trainer process first records what SLURM gave it and what pretrain.dist
# resolves from that, then runs the real trainer
if [ "$1 $2" = "-m pretrain" ]; then
    {python} -c 'import json, os; from pretrain import dist; d = dist.resolve()
env = {{k: os.environ.get(k) for k in ("SLURMD_NODENAME", "CUDA_VISIBLE_DEVICES", "SLURM_CPUS_PER_TASK")}}
visible = len(env["CUDA_VISIBLE_DEVICES"].split(",")) if env["CUDA_VISIBLE_DEVICES"] else 0
print(json.dumps(dict(env, rank=d.rank, world=d.world_size, local_rank=d.local_rank,
                      device=dist.device_index(d.local_rank, visible))))' >> {log}
fi
exec {python} "$@"
"""


@pytest.mark.parametrize("launch,per_task", [("srun", False), ("srun", True), ("torchrun", False)])
def test_slurm_gpu_job_gives_each_rank_its_own_gpu(slurm_cluster, work, tmp_path, launch, per_task):
    """train.sbatch on 2 nodes x 2 GPUs (gres), 4 ranks: SLURM allocates and binds the GPUs, the script passes
    them on, and the device each rank picks (pretrain.dist.device_index, the trainer's rule) is a
    different physical GPU for every rank of a node; srun tasks get --cpus-per-task, torchrun the whole node."""
    tmp_path.chmod(0o755)
    log, probe = tmp_path / "probe.jsonl", tmp_path / "python"
    probe.write_text(PROBE.format(python=sys.executable, log=log))
    probe.chmod(0o755)
    name = f"gpu-{launch}-{'per-task' if per_task else 'per-node'}"
    # --gpus-per-task alone would clash with the script's own --gpus-per-node=8: SLURM wants both to agree
    gpus = ("--gpus-per-node=2", "--gpus-per-task=1") if per_task else ("--gpus-per-node=2",)
    shape = (*gpus, "--ntasks-per-node=2", "--cpus-per-task=2") if launch == "srun" else \
        (*gpus, "--ntasks-per-node=1", "--cpus-per-task=4")
    t0 = time.monotonic()
    job = _sbatch(slurm_cluster, work, name, "optim.max_steps=2", "checkpoint.every_steps=0",
                  env={"LAUNCH": launch, "PYTHON": str(probe)}, shape=shape)
    info = slurm_cluster.wait_job(job, timeout=500)
    out = (work / f"{name}-{job}.out").read_text()
    TIMES[f"slurm ({launch}, {' '.join(gpus)}) 4 ranks on 2 nodes x 2 GPUs, 2 steps"] = time.monotonic() - t0
    assert info["JobState"] == "COMPLETED", out[-4000:]
    assert _steps(work / "runs" / name) == [1, 2]
    ranks = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0, 1, 2, 3] and {r["world"] for r in ranks} == {4}, ranks
    for node in ("n1", "n2"):
        on_node = [r for r in ranks if r["SLURMD_NODENAME"] == node]
        assert sorted(r["local_rank"] for r in on_node) == [0, 1], ranks
        visible = [r["CUDA_VISIBLE_DEVICES"].split(",") for r in on_node]
        assert all(len(v) == (1 if per_task else 2) for v in visible), ranks
        picked = {v[r["device"]] for r, v in zip(on_node, visible)}
        assert picked == {"0", "1"}, ranks  # two ranks, two different physical GPUs
        cpus = {r["SLURM_CPUS_PER_TASK"] for r in on_node}
        assert cpus == ({"2"} if launch == "srun" else {"4"}), ranks


def test_deepspeed_launcher_hostfile_two_hosts(ssh_loopback, work, tmp_path):
    t0 = time.monotonic()
    (tmp_path / "hostfile").write_text("n1 slots=1\nn2 slots=1\n")
    env = base_env(HOSTFILE=str(tmp_path / "hostfile"), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   PYTHON=sys.executable, DEEPSPEED_ENV_FILE=str(tmp_path / ".deepspeed_env"))
    r = subprocess.run(["bash", str(REPO / "launch/deepspeed.sh"), str(work / "tiny.yaml"),
                        f"data.train_urls={work}/shards/train.json", f"run.out_dir={tmp_path}", "run.name=ds",
                        "optim.max_steps=6", "checkpoint.every_steps=3", "data.workers=1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    TIMES["deepspeed hostfile 2 hosts, 6 steps"] = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "TORCH_EXTENSIONS_DIR" in (tmp_path / ".deepspeed_env").read_text()
    run = tmp_path / "ds"
    assert _steps(run) == list(range(1, 7))
    assert json.loads((run / "derived.json").read_text())["world_size"] == 2
    _ranks_agree(run, 2)


def test_torchrun_two_nodes_trains(work, tmp_path):
    t0 = time.monotonic()
    port = free_port()
    procs = [subprocess.Popen(["bash", str(REPO / "launch/torchrun.sh"), str(work / "tiny.yaml"),
                               f"data.train_urls={work}/shards/train.json", f"run.out_dir={tmp_path}", "run.name=tr",
                               "optim.max_steps=6", "checkpoint.every_steps=3", "data.workers=1"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=base_env(NNODES="2", NODE_RANK=str(n), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                                           MASTER_PORT=str(port), PYTHON=sys.executable))
             for n in (0, 1)]
    outs = [p.communicate(timeout=500) for p in procs]
    TIMES["torchrun 2 nodes, 6 steps"] = time.monotonic() - t0
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    run = tmp_path / "tr"
    assert _steps(run) == list(range(1, 7))
    assert json.loads((run / "derived.json").read_text())["world_size"] == 2
    _ranks_agree(run, 2)


def teardown_module():
    for k, v in TIMES.items():
        print(f"\nwall time: {k}: {v:.1f}s", file=sys.__stderr__)
