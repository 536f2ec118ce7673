"""Randomness as a function of where the run is, never of what ran before.

Every draw the training loop makes (drop path, patch dropout, Mixup/CutMix choices, augmentations) comes
from the process-global generators, because that is where timm's layers and transforms draw from. Their
state is therefore *set* from a key that names the place in the run (the run seed, the global
micro-batch index, the rank; or a data batch's identity) right before the draws, instead of being carried
along: a global generator's position depends on everything that drew before it (a DataLoader iterator
created after a resume draws its base seed from it), so carried state breaks exact resume.
See docs/training.md, "Randomness".
"""
from __future__ import annotations

import random

import numpy as np
import torch

STEP = 0x5354  # key domain of the training loop's micro-steps (data batches use their own keys)


def seed_all(*key: int) -> np.random.SeedSequence:
    """Seed Python's, NumPy's and torch's global generators (the CPU's and every CUDA device's) from `key`.

    Host-side only (no device sync); returns the SeedSequence for callers that want a private generator too.
    """
    ss = np.random.SeedSequence([int(k) for k in key])
    a, b = ss.generate_state(2)
    random.seed(int(a))
    np.random.seed(int(b))
    _seed_torch(int(a))
    return ss


def _seed_torch(seed: int) -> None:
    """What `torch.manual_seed` does to the generators training draws from: the CPU's, and every CUDA device's
    where CUDA is there (queued until it starts, as torch does; not in a worker forked after it started).
    `torch.manual_seed` also seeds XPU, MTIA and MPS, and for each not started (always, on machines without
    them) it formats a Python stack trace to queue the seed: 106 us a call against 15 us here (CPU), paid at
    every micro-step and every data batch. The CPU's and CUDA's states after it are the same."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and not torch.cuda._is_in_bad_fork():
        torch.cuda.manual_seed_all(seed)


def generator(*key: int) -> torch.Generator:
    """A private CPU torch generator seeded from `key` (e.g. a DataLoader's, so it leaves the global one alone)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0]))
