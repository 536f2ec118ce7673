"""Learning rate: base rate per 256 images scaled by the effective batch, linear warm-up, then half-cosine
to `min_lr` (the MAE/DeiT recipe).

The schedule is positioned by images seen, not by steps: a run resumed on another world size (another
effective batch) continues warm-up and cosine where they were, at the new batch's linearly scaled peak.
With a constant batch it is the usual per-step schedule exactly."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Schedule:
    peak_lr: float
    min_lr: float
    warmup_samples: int
    total_samples: int

    def __call__(self, samples: int, batch: int) -> float:
        """lr of the optimizer step that starts after `samples` images and trains on `batch` more."""
        if samples < self.warmup_samples:  # the step's own images count: the first step is not at lr 0
            return self.peak_lr * min((samples + batch) / self.warmup_samples, 1.0)
        span = max(self.total_samples - self.warmup_samples, 1)
        t = min((samples - self.warmup_samples) / span, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def state_dict(self) -> dict:
        """The horizon a resume keeps (the peak follows the resumed run's own batch)."""
        return {"warmup_samples": self.warmup_samples, "total_samples": self.total_samples}


def peak_lr(optim_cfg, effective_batch: int) -> float:
    return optim_cfg.lr_per_256 * effective_batch / 256


def build_schedule(optim_cfg, effective_batch: int, steps_per_epoch: int, total_steps: int,
                   horizon: dict | None = None) -> Schedule:
    """The run's schedule; `horizon` (a checkpoint's `Schedule.state_dict()`) keeps a resumed run's
    warm-up and cosine where the checkpoint had them, whatever the new effective batch."""
    peak = peak_lr(optim_cfg, effective_batch)
    warmup = optim_cfg.warmup_steps or int(round(optim_cfg.warmup_epochs * steps_per_epoch))
    s = Schedule(peak_lr=peak, min_lr=min(optim_cfg.min_lr, peak),
                 warmup_samples=min(warmup, total_steps) * effective_batch,
                 total_samples=total_steps * effective_batch)
    return replace(s, **horizon) if horizon else s
