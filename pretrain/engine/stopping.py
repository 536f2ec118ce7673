"""Stopping on request: SIGTERM / SIGUSR1 (SLURM's pre-emption warning) set a flag; the loop finishes its
step, checkpoints and returns, and the command exits 75 (requeue). Every rank must stop after the same
step, so the ranks vote on the flag."""
from __future__ import annotations

import contextlib
import signal
import threading

import torch
import torch.distributed as dist


@contextlib.contextmanager
def stop_signals(restore: bool = True):
    """A flag that SIGTERM and SIGUSR1 set. Further signals only set it again (the handler does nothing else:
    no I/O that a signal could re-enter). Handlers are restored afterwards when `restore` (only installed on
    the main thread)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    for s in previous:
        signal.signal(s, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        for s, h in previous.items() if restore else ():
            signal.signal(s, h)


def stop_requested(flag: threading.Event, step: int, every_steps: int, world: int, group=None) -> bool:
    """Whether any rank's `flag` is set: the same answer on every rank at the same step. Many ranks vote
    after every `every_steps`-th step (run.stop_check_steps; a CPU all-reduce on `group`, a gloo group: no
    device sync); one process looks after every step."""
    if world == 1:
        return flag.is_set()
    if step % every_steps:
        return False
    vote = torch.tensor([1 if flag.is_set() else 0], dtype=torch.int32)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=group)
    return bool(vote.item())
