"""One resolver for the process environment: SLURM, torchrun / torch elastic, the deepspeed launcher,
or a single process. It fills RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT so that
torch.distributed and DeepSpeed see one consistent picture, and fails loudly on a half-set environment.

Every rendezvous has a bounded timeout; its error names the address, port and rank, and rank 0 says
which ranks never arrived. Multi-node hangs are the most expensive failure our users have, so the
rendezvous is done here (a TCPStore plus a join barrier) rather than left to a silent default.
"""
from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import re
import socket
import struct
import subprocess
import time
from dataclasses import dataclass

from pretrain.errors import UserError

DEFAULT_PORT = 29500
RDZV_TIMEOUT_ENV = "VIT_PRETRAIN_RDZV_TIMEOUT"
"""Seconds every rank waits for all others to join (default 300)."""
COLLECTIVE_TIMEOUT_ENV = "VIT_PRETRAIN_COLLECTIVE_TIMEOUT"
"""Seconds a collective may block before the process group aborts it (default 1800)."""
GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"
"""gloo's network interface; derived in setup() when unset (the user's value wins)."""
SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


class RendezvousError(UserError):
    """The ranks could not meet: wrong address or port, a rank that never started, a firewall."""


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
        master_port = _port(env) if env.get("MASTER_PORT") else _free_port()
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
        master_port = _port(env) if env.get("MASTER_PORT") else _free_port()
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_env(d: DistEnv) -> None:
    """Write the resolved values back as the variables torch.distributed and DeepSpeed read."""
    os.environ.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
                      LOCAL_WORLD_SIZE=str(d.local_world_size), MASTER_ADDR=d.master_addr,
                      MASTER_PORT=str(d.master_port))


def _env_seconds(key: str, default: float) -> float:
    raw = os.environ.get(key)
    if not raw:
        return default
    try:
        v = float(raw)
    except ValueError:
        raise UserError(f"environment variable {key}={raw!r} is not a number of seconds") from None
    if v <= 0:
        raise UserError(f"environment variable {key}={raw!r} must be > 0 seconds")
    return v


def _local_addr_to(host: str) -> str | None:
    """This machine's IPv4 address on the route to `host` (connecting a UDP socket sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:  # no IPv4 address or no route
        return None


def _interface_of(addr: str) -> str | None:
    """The interface whose (primary) IPv4 address is `addr`. Hand-written with the standard library:
    neither torch nor gloo exposes this, and psutil or iproute2 may be missing on compute nodes."""
    if ipaddress.ip_address(addr).is_loopback:
        return next((name for _, name in socket.if_nameindex() if name == "lo"), None)
    for _, name in socket.if_nameindex():
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                req = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:  # the interface has no IPv4 address
            continue
        if socket.inet_ntoa(req[20:24]) == addr:
            return name
    return None


def gloo_interface(master_addr: str, peer_addrs: list[str], multi_node: bool) -> str | None:
    """The interface gloo should use: the one on the route to MASTER_ADDR. gloo would otherwise take the
    address the host name resolves to, on many distributions 127.0.1.1, which other nodes cannot reach.
    On the master's own node that route is loopback whenever MASTER_ADDR is the node's own name, so a job
    spanning nodes takes the route to a rank on another node (`peer_addrs`: each rank's own address
    towards MASTER_ADDR, exchanged at the rendezvous) instead. None: no IPv4 route; leave gloo's default."""
    local = _local_addr_to(master_addr)
    if local and multi_node and ipaddress.ip_address(local).is_loopback:
        remote = next((a for a in peer_addrs if a and not ipaddress.ip_address(a).is_loopback), None)
        local = _local_addr_to(remote) if remote else None
    return _interface_of(local) if local else None


def _rendezvous(d: DistEnv, timeout_s: float):
    """A TCPStore all ranks reach, and a join barrier whose timeout names the missing ranks.
    Each rank also sets GLOO_SOCKET_IFNAME (unless set) from the addresses exchanged here."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    host = socket.gethostname()
    try:
        socket.getaddrinfo(d.master_addr, d.master_port)
    except socket.gaierror:
        raise RendezvousError(f"MASTER_ADDR {d.master_addr!r} does not resolve on host {host} ({d.where}); "
                              "add it to DNS or /etc/hosts, or set MASTER_ADDR to an IP address") from None
    # torchrun's agent already hosts a store at MASTER_ADDR:MASTER_PORT: every worker is a client of it
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    is_server = d.rank == 0 and not agent_store
    try:
        store = dist.TCPStore(d.master_addr, d.master_port, None, is_server, timeout=timeout,
                              wait_for_workers=False, multi_tenant=True)
    except Exception as e:  # DistNetworkError / RuntimeError / TimeoutError from c10d
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if is_server:
            raise RendezvousError(f"rank 0 could not listen on port {d.master_port} ({d.where}, host {host}): "
                                  f"{first}; pick a free MASTER_PORT") from None
        raise RendezvousError(f"rank {d.rank} on host {host} could not reach the rendezvous store at "
                              f"{d.master_addr}:{d.master_port} within {timeout_s:.0f}s ({d.where}): {first}; "
                              "is rank 0 running, are MASTER_ADDR/MASTER_PORT the same on every rank, "
                              "and is the port open between nodes?") from None
    prefix = f"vit-pretrain/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store.set(f"{prefix}/join/{d.rank}", host)
    store.set(f"{prefix}/addr/{d.rank}", _local_addr_to(d.master_addr) or "")
    store.add(f"{prefix}/count", 1)
    deadline = time.monotonic() + timeout_s
    while (n := store.add(f"{prefix}/count", 0)) < d.world_size:
        if time.monotonic() > deadline:
            keys = [f"{prefix}/join/{r}" for r in range(d.world_size)]
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            shown = ", ".join(map(str, missing[:16])) + (" ..." if len(missing) > 16 else "")
            raise RendezvousError(f"rendezvous at {d.master_addr}:{d.master_port} timed out after {timeout_s:.0f}s "
                                  f"on rank {d.rank} (host {host}, {d.launcher}): {n}/{d.world_size} ranks "
                                  f"joined, missing ranks: {shown}; check that every node started and "
                                  f"uses the same MASTER_ADDR/MASTER_PORT and WORLD_SIZE")
        time.sleep(0.1)
    if GLOO_IFNAME_ENV not in os.environ:
        peers = [store.get(f"{prefix}/addr/{r}").decode() for r in range(d.world_size)]
        ifname = gloo_interface(d.master_addr, peers, multi_node=d.world_size > d.local_world_size)
        if ifname:
            os.environ[GLOO_IFNAME_ENV] = ifname
    return dist.PrefixStore(f"{prefix}/pg", store)


def setup(timeout_s: float | None = None, backend: str | None = None,
          collective_timeout_s: float | None = None) -> DistEnv:
    """Resolve, export and initialise torch.distributed (DeepSpeed wraps it when an engine is built).

    timeout_s bounds the rendezvous (default $VIT_PRETRAIN_RDZV_TIMEOUT or 300 s);
    collective_timeout_s bounds each later collective (default $VIT_PRETRAIN_COLLECTIVE_TIMEOUT or 1800 s).
    A single process needs no rendezvous but is initialised the same way, so DeepSpeed works unchanged.
    """
    import torch
    import torch.distributed as dist

    d = resolve()
    export_env(d)
    if dist.is_initialized():
        return d
    timeout_s = timeout_s or _env_seconds(RDZV_TIMEOUT_ENV, 300.0)
    collective_timeout_s = collective_timeout_s or _env_seconds(COLLECTIVE_TIMEOUT_ENV, 1800.0)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        index = device_index(d.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        # DeepSpeed takes LOCAL_RANK for the device index (engine, ZeRO-3's Init, its comm layer): hand it ours
        os.environ["LOCAL_RANK"] = str(index)
    if d.world_size == 1:
        store = dist.HashStore()
    else:
        store = _rendezvous(d, timeout_s)
    try:
        dist.init_process_group(backend, store=store, rank=d.rank, world_size=d.world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout_s))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        ifname = os.environ.get(GLOO_IFNAME_ENV, "unset")
        raise RendezvousError(f"process group ({backend}) failed to start on {d.where}, host "
                              f"{socket.gethostname()}: {first}; for gloo set GLOO_SOCKET_IFNAME (now {ifname}), "
                              "for nccl NCCL_SOCKET_IFNAME, to the interface that reaches the other nodes") from None
    # DeepSpeed's comm layer is not initialised here: `deepspeed.initialize` wraps this process group
    # itself when an engine is built. Initialising it eagerly as well (deepspeed.init_distributed) made
    # about 1 in 20 two-process torchrun jobs abort at interpreter exit ("terminate called without an
    # active exception") in paths that never build an engine (eval, plain collectives).
    return d


def teardown(barrier: bool = True) -> None:
    """Leave the process group. The barrier first lets every rank finish its last collective: without it
    a rank that exits early can abort a peer still inside gloo (seen as `terminate called` at exit).
    Pass barrier=False on error paths, where peers may be gone."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if barrier and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except Exception:  # a peer died: nothing left to wait for
            pass
    dist.destroy_process_group()
