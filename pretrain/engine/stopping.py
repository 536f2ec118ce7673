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


class StopVote:
    """Whether any rank's stop flag is set, answered at the same step on every rank without a blocking
    collective each step. After every `every`-th step (run.stop_check_steps) each rank starts a vote, a
    non-blocking CPU all-reduce of its flag on `group` (gloo: no device sync), and waits on the one started
    `every` steps before, which had those steps to finish behind the training. A signal is honoured within
    2 x `every` steps; every rank decides at the same step. One process looks at its flag after every step.
    """

    def __init__(self, flag: threading.Event, every: int, world: int, group=None):
        self.flag, self.every, self.world, self.group = flag, every, world, group
        self._pending = None  # (work, vote) of the vote in flight

    def __call__(self, step: int) -> bool:
        """After step `step`: -> True when the ranks agreed to stop (every rank gets the same answer)."""
        if self.world == 1:
            return self.flag.is_set()
        if step % self.every:
            return False
        stop = self._result()
        if not stop:
            vote = torch.tensor([1 if self.flag.is_set() else 0], dtype=torch.int32)
            self._pending = dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group, async_op=True), vote
        return stop

    def close(self) -> None:
        """Wait for the vote in flight: at the run's end, which every rank reaches after the same step."""
        self._result()

    def _result(self) -> bool:
        if self._pending is None:
            return False
        (work, vote), self._pending = self._pending, None
        work.wait()
        return bool(vote.item())  # a CPU tensor: no device sync
