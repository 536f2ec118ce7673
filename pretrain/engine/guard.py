"""The non-finite guard. A step whose loss or gradient norm is not finite makes no update (DeepSpeed's ZeRO
optimizers skip it; at stage 0 engine/ds.py's `guarded` optimizer does, on the device); the guard counts such
steps on the device, and at the next logging step says which value was not finite and ends the run once
optim.max_nonfinite_steps of them came in a row. Nothing here reads the device between logging steps."""
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
        """`group`: a CPU (gloo) process group for the skipped steps' losses (None: the default group)."""
        self.limit = max_in_a_row + (FP16_GRACE if fp16 else 0)
        self.console, self.fp16, self.world, self.group = console, fp16, world, group
        self.total = 0  # skipped steps of the run up to the last read (a checkpoint carries it)
        self.in_a_row = 0  # consecutive skipped steps up to the last read
        self._dev: dict[str, torch.Tensor] = {}  # this window's counters, on the device

    def record(self, skipped: torch.Tensor, loss_sum: torch.Tensor, step: int) -> None:
        """After step `step`: `skipped` 1.0 when it made no update (0-dim, on the device), `loss_sum` this rank's
        loss summed over its micro-steps. Device arithmetic only."""
        d = self._dev
        if not d:
            zero = torch.zeros_like(skipped)
            d.update(count=zero, longest=zero, run=zero + self.in_a_row, last=zero, bad_n=zero, bad=zero)
        bad = (~torch.isfinite(loss_sum)) & (skipped > 0)
        d["count"] = d["count"] + skipped
        d["run"] = (d["run"] + skipped) * skipped  # consecutive skips ending at this step
        d["longest"] = torch.maximum(d["longest"], d["run"])
        d["last"] = torch.where(skipped > 0, float(step), d["last"])
        d["bad_n"] = d["bad_n"] + bad.float()
        d["bad"] = torch.where(bad, loss_sum.float(), d["bad"])

    def stats(self) -> torch.Tensor | None:
        """(skipped, longest run, run at the end, last skipped step) of the window, on the device; None if
        no step was recorded. Equal on every rank (the skip is global)."""
        d = self._dev
        return torch.stack([d["count"], d["longest"], d["run"], d["last"]]) if d else None

    def pending(self) -> int:
        """Skipped steps of the run including the unread window (a host read: for checkpoints, which sync)."""
        return self.total + (int(self._dev["count"]) if self._dev else 0)

    def check(self, stats: list[float], engine, last_good: str) -> int:
        """At a logging step, with `stats` read from `stats()`: count, warn, and stop after the limit. -> the
        window's skipped steps. A collective on the CPU group when the window skipped a step (every rank
        then calls it)."""
        count, longest, run, last = (int(v) for v in stats)
        self.total, self.in_a_row = self.total + count, run
        if not count:
            self._dev = {}
            return 0
        why = self._why(engine)
        self._dev = {}
        if longest >= self.limit:
            raise NonFiniteError(
                f"{longest} consecutive steps with a non-finite loss or gradient norm, the last at step "
                f"{last}: {why}; no update was applied, last good checkpoint: {last_good}. Lower "
                "optim.lr_per_256, raise optim.warmup_steps, set optim.grad_clip, or try deepspeed.precision=bf16/fp32 "
                "(optim.max_nonfinite_steps sets the limit)")
        if not self.fp16 or "non-finite loss" in why:  # a loss-scale overflow is no news
            self.console.warn(f"{count} step(s) skipped (no update), the last at step {last}: {why}; {run} in a "
                              f"row, the run stops at {self.limit} (optim.max_nonfinite_steps)")
        return count

    def _why(self, engine) -> str:
        """Which value was not finite: each rank's loss, else the gradient norm."""
        mine = torch.stack([self._dev["bad_n"], self._dev["bad"]]).double().cpu()  # host read: windows with skips
        losses = [mine]
        if self.world > 1:
            losses = [torch.zeros_like(mine) for _ in range(self.world)]
            dist.all_gather(losses, mine, group=self.group)
        bad = [f"rank {r} ({v[1].item()})" for r, v in enumerate(losses) if v[0].item() > 0]
        if bad:
            return "non-finite loss on " + ", ".join(bad)
        gn = engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else float("nan")
        return f"non-finite gradient norm{'' if math.isfinite(gn) else f' ({gn})'}, losses finite on every rank"
