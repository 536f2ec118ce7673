"""The resolver: which rank, world size and rendezvous address this process has, from SLURM, torchrun /
torch elastic, the deepspeed launcher or a single process; a half-set environment is an error."""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass

from pretrain.errors import UserError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "single" | "torchrun" | "deepspeed" | "slurm"

    @property
    def where(self) -> str:
        return f"rank {self.rank}/{self.world_size} ({self.launcher}) at {self.master_addr}:{self.master_port}"


def _int(env: dict, key: str, lo: int | None = None, hi: int | None = None) -> int:
    try:
        v = int(env[key])
    except ValueError:
        raise UserError(f"environment variable {key}={env[key]!r} is not an integer; fix or unset it") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise UserError(f"environment variable {key}={v} is out of range [{lo}, {hi}]; fix or unset it")
    return v


def _port(env: dict, key: str = "MASTER_PORT") -> int:
    return _int(env, key, 1, 65535)


def _expand_counts(spec: str) -> list[int]:
    """SLURM's compressed per-node counts: '2(x3),1' -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return []
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _first_host(nodelist: str) -> str:
    """First host of a SLURM node list, by scontrol when present, else by parsing 'gpu[01-04,07],cpu1'."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # hand-written fallback for machines without scontrol (a login node's container, tests)
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise UserError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR to the first node")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _resolve_slurm(env: dict) -> DistEnv:
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env and _int(env, "SLURM_NTASKS", 1) > 1:
        # the batch script itself, not a task started by srun: rank 0 would wait for ranks that never come
        raise UserError(f"SLURM_NTASKS={env['SLURM_NTASKS']} but this process is the batch script, not an "
                        "srun task; start the trainer with `srun` (see launch/slurm/train.sbatch)")
    world = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS", 1)
    rank = _int(env, "SLURM_PROCID", 0)
    local_rank = _int(env, "SLURM_LOCALID", 0) if "SLURM_LOCALID" in env else 0
    per_node = _expand_counts(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
    node = int(env["SLURM_NODEID"]) if env.get("SLURM_NODEID", "").isdigit() else 0
    local_world = per_node[node] if node < len(per_node) else local_rank + 1
    if env.get("MASTER_ADDR"):
        master_addr = env["MASTER_ADDR"]
    elif world == 1:
        master_addr = "127.0.0.1"
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise UserError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: cannot find the master node; "
                            "set MASTER_ADDR or run inside an allocation")
        master_addr = _first_host(nodelist)
    # a port per job, so two jobs sharing a node do not collide; stable across a requeue of the same job
    master_port = _port(env) if "MASTER_PORT" in env else DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0") or 0) % 5000
    return DistEnv(rank, world, local_rank, local_world, master_addr, master_port, "slurm")


def resolve(env: dict | None = None) -> DistEnv:
    """Read the launcher's variables; never touches the network (scontrol aside).

    Order: RANK/WORLD_SIZE (torchrun, torch elastic, the deepspeed launcher, or set by hand) win over
    SLURM_* (srun without a launcher in between); neither means a single process.
    """
    env = dict(os.environ if env is None else env)
    has_rank, has_world = "RANK" in env, "WORLD_SIZE" in env
    if has_rank or has_world:
        if not (has_rank and has_world):
            given, absent = ("RANK", "WORLD_SIZE") if has_rank else ("WORLD_SIZE", "RANK")
            raise UserError(f"half-set distributed environment: {given}={env[given]} is set but {absent} is not; "
                            "launch with torchrun, deepspeed or srun, or unset both for a single process")
        world = _int(env, "WORLD_SIZE", 1)
        rank = _int(env, "RANK", 0)
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if world > 1 and missing:
            raise UserError(f"half-set distributed environment: RANK={rank} WORLD_SIZE={world} but "
                            f"{' and '.join(missing)} not set; every rank needs the same MASTER_ADDR and MASTER_PORT")
        if world > 1 and "LOCAL_RANK" not in env:
            raise UserError(f"half-set distributed environment: RANK={rank} WORLD_SIZE={world} but LOCAL_RANK "
                            "not set; it picks the GPU of this process (torchrun and deepspeed set it)")
        local_rank = _int(env, "LOCAL_RANK", 0) if "LOCAL_RANK" in env else 0
        if "LOCAL_WORLD_SIZE" in env:
            local_world = _int(env, "LOCAL_WORLD_SIZE", 1)
        elif "LOCAL_SIZE" in env:  # the deepspeed launcher's name
            local_world = _int(env, "LOCAL_SIZE", 1)
        else:
            local_world = local_rank + 1
        launcher = "deepspeed" if "CROSS_RANK" in env else "torchrun"  # deepspeed's launch.py sets CROSS_RANK
        master_addr = env.get("MASTER_ADDR") or "127.0.0.1"
        master_port = _port(env) if env.get("MASTER_PORT") else free_port()
        d = DistEnv(rank, world, local_rank, local_world, master_addr, master_port, launcher)
    elif "SLURM_PROCID" in env or env.get("SLURM_NTASKS", "1") != "1":
        # (an salloc shell of one task sets SLURM_NTASKS=1 and no SLURM_PROCID: a single process)
        for k in ("SLURM_PROCID", "SLURM_NTASKS"):
            if k not in env:
                raise UserError(f"half-set SLURM environment: {k} is missing; run the trainer with srun "
                                "inside an allocation, or unset SLURM_* for a single process")
        d = _resolve_slurm(env)
    else:
        if env.get("LOCAL_RANK", "0") != "0":
            raise UserError(f"half-set distributed environment: LOCAL_RANK={env['LOCAL_RANK']} without RANK and "
                            "WORLD_SIZE; launch with torchrun or deepspeed, or unset LOCAL_RANK")
        master_port = _port(env) if env.get("MASTER_PORT") else free_port()
        d = DistEnv(0, 1, 0, 1, "127.0.0.1", master_port, "single")
    if not 0 <= d.rank < d.world_size:
        raise UserError(f"rank {d.rank} is outside world size {d.world_size}: check the launcher's variables")
    if not 0 <= d.local_rank < d.local_world_size:
        raise UserError(f"local rank {d.local_rank} is outside local world size {d.local_world_size}: "
                        "check the launcher's variables")
    return d


def device_index(local_rank: int, visible: int) -> int:
    """The CUDA device index of the process with `local_rank` when `visible` GPUs are visible to it.

    One visible GPU means the launcher bound one per task (`srun --gpus-per-task=1`, `--gpu-bind`,
    CUDA_VISIBLE_DEVICES per process): it is device 0 whatever the local rank. Otherwise each process of
    the node takes the GPU of its local rank; two processes on one GPU is an error NCCL also refuses.
    """
    if visible <= 0:
        raise UserError("no CUDA device is visible to this process; check CUDA_VISIBLE_DEVICES and the job's "
                        "GPU request, or train on the CPU with run.device=cpu")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else ""
    raise UserError(f"local rank {local_rank} has no GPU of its own: {visible} GPUs are visible{shown}; start at "
                    f"most {visible} processes per node, or bind one GPU per task (srun --gpus-per-task=1)")


def rank_device(local_rank: int, want: str = "auto"):
    """This rank's torch device: the CPU, or its CUDA device by `device_index`. `want`: auto (CUDA when
    visible), cpu or cuda (an error when none is visible), as `run.device` says."""
    import torch

    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("config key run.device: got 'cuda' but no CUDA device is visible; use run.device=auto or cpu")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", device_index(local_rank, torch.cuda.device_count()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_env(d: DistEnv) -> None:
    """Write the resolved values back as the variables torch.distributed and DeepSpeed read."""
    os.environ.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
                      LOCAL_WORLD_SIZE=str(d.local_world_size), MASTER_ADDR=d.master_addr,
                      MASTER_PORT=str(d.master_port))


