"""The non-finite guard. A step whose loss or gradient norm is not finite makes no update (DeepSpeed's ZeRO
optimizers skip it; at stage 0 engine/ds.py's `guarded` optimizer does); the guard counts such steps, says
which value was not finite, and ends the run after optim.max_nonfinite_steps of them in a row."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

FP16_GRACE = 32
"""Extra skips allowed under fp16, whose loss scaler overflows by design while it finds its scale."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int, console, *, fp16: bool, world: int, group=None):
        """`group`: a CPU (gloo) process group for the skipped step's losses (None: the default group)."""
        self.limit = max_in_a_row + (FP16_GRACE if fp16 else 0)
        self.console, self.fp16, self.world, self.group = console, fp16, world, group
        self.total = 0  # every skipped step of the run (a checkpoint carries it)
        self.in_a_row = 0

    def applied(self) -> None:
        self.in_a_row = 0

    def skipped(self, engine, loss_sum: torch.Tensor, step: int, last_good: str) -> None:
        """Step `step` made no update; `loss_sum`: this rank's loss summed over its micro-steps; `last_good`:
        the checkpoint to name when the run ends here. Every rank calls it (the skip is global)."""
        self.total += 1
        self.in_a_row += 1
        why = self._why(engine, loss_sum)
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} consecutive steps with a non-finite loss or gradient norm, the last at step "
                f"{step}: {why}; no update was applied, last good checkpoint: {last_good}. Lower "
                "optim.lr_per_256, raise optim.warmup_steps, set optim.grad_clip, or try deepspeed.precision=bf16/fp32 "
                "(optim.max_nonfinite_steps sets the limit)")
        if not self.fp16 or "non-finite loss" in why:  # a loss-scale overflow is no news
            self.console.warn(f"step {step} skipped (no update): {why}; {self.in_a_row} in a row, the run "
                              f"stops at {self.limit} (optim.max_nonfinite_steps)")

    def _why(self, engine, loss_sum: torch.Tensor) -> str:
        """Which value was not finite: each rank's loss, else the gradient norm. A collective (every rank
        skips the same step: the norm is global)."""
        mine = torch.tensor([float(loss_sum)], dtype=torch.float64)  # host read: skipped steps only
        losses = [mine]
        if self.world > 1:
            losses = [torch.zeros_like(mine) for _ in range(self.world)]
            dist.all_gather(losses, mine, group=self.group)
        bad = [f"rank {r} ({v.item()})" for r, v in enumerate(losses) if not math.isfinite(v.item())]
        if bad:
            return "non-finite loss on " + ", ".join(bad)
        gn = engine.get_global_grad_norm()
        return f"non-finite gradient norm ({float(gn) if gn is not None else 'unknown'}), losses finite on every rank"
