"""Fault injection for the chaos tests (tests/chaos). Unset in real runs.

`$VIT_PRETRAIN_FAULT=RANK:STEP:WHERE` makes rank RANK raise at optimizer step STEP, in the step (`step`),
in evaluation (`eval`) or in the checkpoint write (`save`), or makes its loss NaN in that step (`nan`),
or makes it wait after that step until a stop signal has arrived (`hold`, at most HOLD_S seconds: a test's
signal then lands at a known step, however fast the steps are). STEP may be a range, `3-5`, or open, `3-`;
several faults are joined with commas. Read once, at start.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from pretrain.errors import UserError

FAULT_ENV = "VIT_PRETRAIN_FAULT"
PLACES = ("step", "eval", "save", "nan", "hold")
HOLD_S = 120.0


@dataclass(frozen=True)
class Fault:
    spec: str  # as written, for the error message
    first: int
    last: int | None  # None: open range
    where: str

    def due(self, step: int, where: str) -> bool:
        return where == self.where and self.first <= step and (self.last is None or step <= self.last)


class Faults:
    """The faults of $VIT_PRETRAIN_FAULT that name one rank."""

    def __init__(self, text: str, rank: int):
        self.faults = [f for r, f in map(_parse, filter(None, (s.strip() for s in text.split(",")))) if r == rank]

    @classmethod
    def from_env(cls, rank: int) -> "Faults":
        return cls(os.environ.get(FAULT_ENV, ""), rank)

    def due(self, step: int, where: str) -> str | None:
        """The fault due at optimizer step `step` in place `where` (its spec), or None."""
        return next((f.spec for f in self.faults if f.due(step, where)), None)

    def check(self, step: int, where: str) -> None:
        """Raise when a fault is due here."""
        spec = self.due(step, where)
        if spec:
            raise RuntimeError(f"injected fault ({FAULT_ENV}={spec})")


def _parse(spec: str) -> tuple[int, Fault]:
    """`RANK:STEP:WHERE` -> (rank, fault)."""
    try:
        rank, steps, where = spec.split(":")
        first, dash, last = steps.partition("-")
        if where not in PLACES:
            raise ValueError(where)
        return int(rank), Fault(spec, int(first), (int(last) if last else None) if dash else int(first), where)
    except ValueError:
        raise UserError(f"${FAULT_ENV}: {spec!r} is not RANK:STEP:WHERE (STEP: N, N-M or N-; WHERE: "
                        f"{', '.join(PLACES)}); unset it outside the chaos tests") from None
