"""One resolver for the process environment: SLURM, torchrun / torch elastic, the deepspeed launcher,
or a single process. It fills RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT so that
torch.distributed and DeepSpeed see one consistent picture, and fails loudly on a half-set environment.

Every rendezvous has a bounded timeout; its error names the address, port and rank, and rank 0 says
which ranks never arrived. Multi-node hangs are the most expensive failure our users have, so the
rendezvous is done here (a TCPStore plus a join barrier) rather than left to a silent default.

After the rendezvous a watchdog thread on every rank keeps the job honest (see `Watchdog`): a rank that
fails says so in the store and every other rank ends within seconds, even one blocked in a collective;
a rank that stops answering (killed, SIGSTOPped, wedged) is noticed by its neighbour within
$VIT_PRETRAIN_HEARTBEAT_TIMEOUT seconds. docs/reliability.md has the measured figures.
"""
from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from pretrain.errors import EXIT_PEER_FAILED, UserError

DEFAULT_PORT = 29500
RDZV_TIMEOUT_ENV = "VIT_PRETRAIN_RDZV_TIMEOUT"
"""Seconds every rank waits for all others to join (default 300)."""
COLLECTIVE_TIMEOUT_ENV = "VIT_PRETRAIN_COLLECTIVE_TIMEOUT"
"""Seconds a collective may block before the process group aborts it (default 600). A last resort:
the watchdog ends a job whose rank failed or went silent long before this."""
HEARTBEAT_TIMEOUT_ENV = "VIT_PRETRAIN_HEARTBEAT_TIMEOUT"
"""Seconds a rank may go without a heartbeat before its neighbour ends the job (default 45)."""
PEER_EXIT_DELAY_S = 2.0
"""A rank ended by a peer's failure exits this long after saying so, so that the failing rank exits
first: torchrun names the earliest failure (whole seconds) as the root cause and shows its traceback."""
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
    return store, prefix


def setup(timeout_s: float | None = None, backend: str | None = None,
          collective_timeout_s: float | None = None) -> DistEnv:
    """Resolve, export and initialise torch.distributed (DeepSpeed wraps it when an engine is built).

    timeout_s bounds the rendezvous (default $VIT_PRETRAIN_RDZV_TIMEOUT or 300 s);
    collective_timeout_s bounds each later collective (default $VIT_PRETRAIN_COLLECTIVE_TIMEOUT or 600 s);
    a watchdog (world size > 1) ends the job when a rank fails or goes silent (`Watchdog`).
    A single process needs no rendezvous but is initialised the same way, so DeepSpeed works unchanged.
    """
    import torch
    import torch.distributed as dist

    d = resolve()
    export_env(d)
    if dist.is_initialized():
        return d
    timeout_s = timeout_s or _env_seconds(RDZV_TIMEOUT_ENV, 300.0)
    collective_timeout_s = collective_timeout_s or _env_seconds(COLLECTIVE_TIMEOUT_ENV, 600.0)
    heartbeat_s = _env_seconds(HEARTBEAT_TIMEOUT_ENV, 45.0)
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
        root, prefix = _rendezvous(d, timeout_s)
        store = dist.PrefixStore(f"{prefix}/pg", root)
        global _watchdog
        hosts_store = d.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        _watchdog = Watchdog(d, prefix, heartbeat_s, hosts_store)
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


class Watchdog:
    """A daemon thread per rank that ends this process when the job cannot go on.

    Hand-written because neither torch nor DeepSpeed ends a gloo job on a peer's exception (gloo waits
    out the collective timeout) and torchrun covers only its own launches, not srun or the deepspeed
    launcher. It talks to the rendezvous store on its own connection, every `interval` seconds:
    - it adds 1 to its own heartbeat counter; a counter that stops moving means a dead or stopped process;
    - it ends this process (EXIT_PEER_FAILED) when the store holds an `error` (a peer failed: `report`),
      when its neighbour (rank + 1) has not beaten for `timeout_s` (it records that as the error first,
      so every rank stops, and kills the neighbour if it runs on this host), or when the store is gone
      (rank 0 or the launcher died).
    One neighbour per rank keeps the load on the store flat in the world size.
    """

    def __init__(self, d: DistEnv, prefix: str, timeout_s: float, hosts_store: bool):
        import torch.distributed as dist

        self.d, self.timeout_s, self.hosts_store = d, timeout_s, hosts_store
        self.interval = min(2.0, timeout_s / 10)
        self.peer = (d.rank + 1) % d.world_size
        client = dist.TCPStore(d.master_addr, d.master_port, None, False,
                               timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        self.store = dist.PrefixStore(f"{prefix}/health", client)
        self.failed_here = False  # this rank reported its own failure and is on its way out
        self.closing = False  # teardown: the job is ending normally, the store may go at any time
        self.ending = False  # this thread has said why this rank stops and is about to end it
        self.store.set(f"pid/{d.rank}", f"{socket.gethostname()} {os.getpid()}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vit-pretrain-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen, seen_at = -1, time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self.store.add(f"beat/{self.d.rank}", 1)
                if self.store.check(["error"]):
                    if not self.failed_here:
                        error = self.store.get("error").decode()
                        self.store.add("error_seen", 1)
                        self._end(f"stopped because {error}")
                    return
                if self.store.check([f"done/{self.peer}"]):
                    continue
                beats = self.store.add(f"beat/{self.peer}", 0)
            except Exception as e:  # noqa: BLE001  any store failure means the job is gone
                if self.closing or self.failed_here or self._stop.is_set():
                    return
                self._end(f"stopped: lost the rendezvous store at {self.d.master_addr}:{self.d.master_port} "
                          f"({_first_line(e)}); rank 0 or the launcher has died")
            now = time.monotonic()
            if beats != seen:
                seen, seen_at = beats, now
            elif now - seen_at > self.timeout_s:
                msg = (f"rank {self.peer} failed: no heartbeat for {now - seen_at:.0f}s (killed, stopped or "
                       f"hung; ${HEARTBEAT_TIMEOUT_ENV}={self.timeout_s:g})")
                self._set_error(msg)
                self._kill_peer()
                self._end(f"stopped because {msg}")

    def _kill_peer(self) -> None:
        """SIGKILL the silent neighbour when it runs on this host: a stopped or wedged process cannot end
        itself, and launchers wait for it (torchrun 30 s after SIGTERM; some forever)."""
        try:
            host, pid = self.store.get(f"pid/{self.peer}").decode().split()
            if host == socket.gethostname():
                os.kill(int(pid), signal.SIGKILL)
        except Exception:  # noqa: BLE001  gone already, or not ours to kill: the launcher's job
            pass

    def _set_error(self, msg: str) -> str:
        """Record `msg` as the job's error unless a peer's came first; -> the error that stands."""
        return self.store.compare_set("error", "", msg).decode()

    def _end(self, msg: str) -> None:
        self.ending = True
        print(f"vit-pretrain: rank {self.d.rank}/{self.d.world_size} ({socket.gethostname()}) {msg}",
              file=sys.stderr, flush=True)
        time.sleep(PEER_EXIT_DELAY_S)
        os._exit(EXIT_PEER_FAILED)

    def report(self, msg: str) -> str:
        """This rank failed with `msg`: tell the peers; -> the job's first error (maybe a peer's)."""
        self.failed_here = True
        try:
            first = self._set_error(msg)
            if first != msg:
                self.store.add("error_seen", 1)
            elif self.hosts_store:
                # the store dies with this process: give the peers a moment to read why (bounded)
                deadline = time.monotonic() + 2 * self.interval + 1
                while self.store.add("error_seen", 0) < self.d.world_size - 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
            return first
        except Exception:  # noqa: BLE001  the store is gone: peers learn from their own watchdogs
            return msg

    def stop(self) -> None:
        self._stop.set()


_watchdog: Watchdog | None = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""


def abort(e: BaseException) -> bool:
    """The error path: say at once which rank failed, what and where; tell the peers (their watchdogs end
    them); leave the process group without waiting for anyone (never a collective: peers may be gone).
    -> True when this rank's error is the job's first, False when it only followed a peer's failure
    (a collective that broke because the peer left): the caller then exits with EXIT_PEER_FAILED."""
    import torch.distributed as dist

    first = True
    if dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        msg = f"rank {rank} failed: {type(e).__name__}: {_first_line(e)}{_where(e)}"
        error = _watchdog.report(msg) if _watchdog is not None else msg
        first = error == msg
        said = msg if first else f"stopped because {error} (here: {type(e).__name__}: {_first_line(e)[:100]})"
        if not (_watchdog is not None and _watchdog.ending):  # the watchdog said it already
            print(f"vit-pretrain: rank {rank}/{world} ({socket.gethostname()}) {said}", file=sys.stderr, flush=True)
        # a backstop: if leaving still blocks (a stuck atexit hook, a worker that never joins), go anyway
        t = threading.Timer(30.0, os._exit, (1 if first else EXIT_PEER_FAILED,))
        t.daemon = True
        t.start()
    if dist.is_initialized():
        dist.destroy_process_group()
    if not first:
        time.sleep(PEER_EXIT_DELAY_S)
    return first


def teardown() -> None:
    """Leave the process group after a successful run. The barrier first lets every rank finish its
    last collective: without it a rank that exits early can abort a peer still inside gloo (seen as
    `terminate called` at exit). The watchdog stays on through the barrier, so a peer that fails or
    hangs before reaching it still ends this rank. Error paths use `abort`, never this."""
    import torch.distributed as dist

    global _watchdog
    if not dist.is_initialized():
        return
    if _watchdog is not None:
        _watchdog.closing = True
        try:
            _watchdog.store.set(f"done/{dist.get_rank()}", "1")
        except Exception:  # noqa: BLE001  the store is gone (rank 0 left): nothing to mark
            pass
    if dist.get_world_size() > 1:
        try:
            dist.barrier()
        except Exception:  # a peer died: nothing left to wait for
            pass
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
    dist.destroy_process_group()
