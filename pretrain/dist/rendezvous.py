"""The rendezvous: every rank meets at MASTER_ADDR:MASTER_PORT within a bounded time, or the error names
the address, port and the ranks that never arrived; then the process group and the watchdog start."""
from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import socket
import struct
import time

from pretrain.dist import watchdog
from pretrain.dist.env import DistEnv, device_index, export_env, resolve
from pretrain.errors import UserError, first_line

RDZV_TIMEOUT_ENV = "VIT_PRETRAIN_RDZV_TIMEOUT"
"""Seconds every rank waits for all others to join (default 300)."""
COLLECTIVE_TIMEOUT_ENV = "VIT_PRETRAIN_COLLECTIVE_TIMEOUT"
"""Seconds a collective may block before the process group aborts it (default 600). A last resort:
the watchdog ends a job whose rank failed or went silent long before this."""
GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"
"""gloo's network interface; derived in setup() when unset (the user's value wins)."""
SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


class RendezvousError(UserError):
    """The ranks could not meet: wrong address or port, a rank that never started, a firewall."""


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
        first = first_line(e)
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
    heartbeat_s = _env_seconds(watchdog.HEARTBEAT_TIMEOUT_ENV, 45.0)
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
        hosts_store = d.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        watchdog.start(d, prefix, heartbeat_s, hosts_store)
    try:
        dist.init_process_group(backend, store=store, rank=d.rank, world_size=d.world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout_s))
    except Exception as e:
        first = first_line(e)
        ifname = os.environ.get(GLOO_IFNAME_ENV, "unset")
        raise RendezvousError(f"process group ({backend}) failed to start on {d.where}, host "
                              f"{socket.gethostname()}: {first}; for gloo set GLOO_SOCKET_IFNAME (now {ifname}), "
                              "for nccl NCCL_SOCKET_IFNAME, to the interface that reaches the other nodes") from None
    # DeepSpeed's comm layer is not initialised here: `deepspeed.initialize` wraps this process group
    # itself when an engine is built. Initialising it eagerly as well (deepspeed.init_distributed) made
    # about 1 in 20 two-process torchrun jobs abort at interpreter exit ("terminate called without an
    # active exception") in paths that never build an engine (eval, plain collectives).
    return d
