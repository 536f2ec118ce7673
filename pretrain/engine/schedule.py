"""Learning rate: base rate per 256 images scaled by the effective batch, per-step linear warm-up,
then half-cosine to `min_lr` (the MAE/DeiT recipe)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        """lr for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        t = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_schedule(optim_cfg, effective_batch: int, steps_per_epoch: int, total_steps: int) -> Schedule:
    peak = optim_cfg.lr_per_256 * effective_batch / 256
    warmup = optim_cfg.warmup_steps or int(round(optim_cfg.warmup_epochs * steps_per_epoch))
    return Schedule(peak_lr=peak, min_lr=min(optim_cfg.min_lr, peak), warmup_steps=min(warmup, total_steps),
                    total_steps=total_steps)
