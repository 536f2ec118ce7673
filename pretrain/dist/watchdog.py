"""After the rendezvous: a watchdog thread per rank that ends the job when a rank fails or goes silent,
and the two ways out of a job, `abort` (the error path, never a collective) and `teardown` (success)."""
from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Callable

from pretrain.dist.env import DistEnv
from pretrain.errors import EXIT_PEER_FAILED, first_line

HEARTBEAT_TIMEOUT_ENV = "VIT_PRETRAIN_HEARTBEAT_TIMEOUT"
"""Seconds a rank may go without a heartbeat before its neighbour ends the job (default 45)."""
PEER_EXIT_DELAY_S = 2.0
"""A rank ended by a peer's failure exits this long after saying so, so that the failing rank exits
first: torchrun names the earliest failure (whole seconds) as the root cause and shows its traceback."""


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
                          f"({first_line(e)}); rank 0 or the launcher has died")
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

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the thread and wait for it (bounded). Never leave it running into interpreter shutdown:
        a daemon thread inside a store call at exit is ended by CPython while C++ still runs under it,
        which aborts the process (`terminate called without an active exception`, SIGABRT) after a
        job that succeeded."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)


_watchdog: Watchdog | None = None
"""This process's watchdog, from `start` (setup) to `teardown`."""


def start(d: DistEnv, prefix: str, timeout_s: float, hosts_store: bool) -> None:
    global _watchdog
    _watchdog = Watchdog(d, prefix, timeout_s, hosts_store)


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
        msg = f"rank {rank} failed: {type(e).__name__}: {first_line(e)}{_where(e)}"
        error = _watchdog.report(msg) if _watchdog is not None else msg
        first = error == msg
        said = msg if first else f"stopped because {error} (here: {type(e).__name__}: {first_line(e)[:100]})"
        if not (_watchdog is not None and _watchdog.ending):  # the watchdog said it already
            print(f"vit-pretrain: rank {rank}/{world} ({socket.gethostname()}) {said}", file=sys.stderr, flush=True)
        # a backstop: if leaving still blocks (a stuck atexit hook, a worker that never joins), go anyway
        t = threading.Timer(30.0, os._exit, (1 if first else EXIT_PEER_FAILED,))
        t.daemon = True
        t.start()
    if dist.is_initialized():
        dist.destroy_process_group()
    if _watchdog is not None:  # it may still end this process meanwhile: that exit is the one intended
        _watchdog.stop()
    if not first:
        time.sleep(PEER_EXIT_DELAY_S)
    return first


def run_guarded(body: Callable[[], int]) -> int:
    """A command's body with the error path every command shares: an exception says which rank failed and
    ends the peers at once (`abort`), then propagates; a rank that only followed a peer's failure exits
    with EXIT_PEER_FAILED and no traceback of its own."""
    try:
        return body()
    except BaseException as e:
        if not abort(e):
            return EXIT_PEER_FAILED
        raise


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
