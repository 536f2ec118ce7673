"""One resolver for the process environment: SLURM, torchrun / torch elastic, the deepspeed launcher,
or a single process. It fills RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT so that
torch.distributed and DeepSpeed see one consistent picture, and fails loudly on a half-set environment.
Every rendezvous has a bounded timeout; its error names the address, port and rank.
"""
from __future__ import annotations

import datetime
import os
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
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: dict, key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise UserError(f"environment variable {key}={env[key]!r} is not an integer") from None


def _slurm_master(env: dict) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: cannot find the master node")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # no scontrol: first host of a simple list like "n1,n2" or "gpu[01-04]"
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, rng = first.split("[", 1)
        first = prefix + rng.split("-")[0].split(",")[0].rstrip("]")
    return first


def resolve(env: dict | None = None) -> DistEnv:
    """Read the launcher's variables; never touches the network."""
    env = dict(os.environ if env is None else env)
    has_rank = "RANK" in env
    has_world = "WORLD_SIZE" in env
    if has_rank or has_world:
        # torchrun, torch elastic and the deepspeed launcher all set these
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        world = _int(env, "WORLD_SIZE") if has_world else None
        if world == 1 and missing and set(missing) <= {"MASTER_ADDR", "MASTER_PORT"}:
            missing = []
        if missing:
            raise UserError(f"half-set distributed environment: {', '.join(missing)} missing while "
                            f"{'RANK' if has_rank else 'WORLD_SIZE'} is set; launch with torchrun, deepspeed "
                            "or srun, or unset RANK/WORLD_SIZE for a single process")
        rank = _int(env, "RANK")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1
        launcher = "deepspeed" if "CROSS_RANK" in env else "torchrun"  # deepspeed's launch.py sets CROSS_RANK
        master_addr = env.get("MASTER_ADDR", "127.0.0.1")
        master_port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        local_world = _int(env, "SLURM_NTASKS_PER_NODE") if env.get("SLURM_NTASKS_PER_NODE", "").isdigit() else 1
        launcher = "slurm"
        master_addr = env.get("MASTER_ADDR") or (_slurm_master(env) if world > 1 else "127.0.0.1")
        master_port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else (
            DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 1000)
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1
        launcher = "single"
        master_addr = "127.0.0.1"
        master_port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port()
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside world size {world}: check the launcher's variables")
    if not 0 <= local_rank < max(local_world, local_rank + 1):
        raise UserError(f"local rank {local_rank} is negative")
    return DistEnv(rank, world, local_rank, local_world, master_addr, master_port, launcher)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_env(d: DistEnv) -> None:
    """Write the resolved values back as the variables torch.distributed and DeepSpeed read."""
    os.environ.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
                      LOCAL_WORLD_SIZE=str(d.local_world_size), MASTER_ADDR=d.master_addr,
                      MASTER_PORT=str(d.master_port))


def setup(timeout_s: float = 300.0, backend: str | None = None) -> DistEnv:
    """Resolve, export and initialise torch.distributed (through DeepSpeed) with a bounded timeout."""
    import torch
    import torch.distributed as dist

    d = resolve()
    export_env(d)
    if dist.is_initialized():
        return d
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(d.local_rank % max(torch.cuda.device_count(), 1))
    import deepspeed

    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s), rank=d.rank,
                                   world_size=d.world_size)
    except Exception as e:  # rendezvous failures come as RuntimeError/DistStoreError/TimeoutError
        raise UserError(f"rendezvous failed for rank {d.rank}/{d.world_size} at {d.master_addr}:{d.master_port} "
                        f"({d.launcher}, {backend}, timeout {timeout_s:.0f}s): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return d


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
