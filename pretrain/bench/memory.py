"""`bench memory`: the largest micro-batch that fits at ZeRO 0 on one rank, with its peak memory and img/s, for
each arch, task (supervised, MAE) and activation checkpointing off/on; and per-rank memory at ZeRO 1-3 on N
ranks on paper (`pretrain.bench.memory_model`), its activations fitted to the measured points.

Each probe runs in its own process (`python -m pretrain.bench.memory --probe SPEC`): an out-of-memory error
leaves the caching allocator of the process that hit it fragmented and holding what its frames referenced, so
no later probe may share that process. A probe builds the Trainer as `bench gpu` does (bf16 autocast, torch's
fused AdamW, ZeRO 0), times a few steps the way `bench gpu` does, and prints one JSON line: whether it fit,
the peak memory (CUDA's max_memory_allocated; on the CPU the resident set's high-water growth, as `bench
zero`) and img/s. The search (`largest_fit`): doubling from `--memory-start`, the first fit's slope on paper
jumping to the largest power-of-two multiple at or below the batch it predicts; halving while probes fail;
bisection down to a factor of 2; then `--memory-refine` midpoints. A probe that crashes for any reason but
memory, or overruns `--memory-probe-s`, stops that search and is reported, never taken as "does not fit".
One row per configuration, yielded as soon as its search ends (the JSON is rewritten after each); a run
stopped by `--memory-budget-s` or interrupted keeps every probe it finished.

`--memory-dry-run`: `bench gpu`'s tiny model on the device at hand with a simulated memory limit, the same
code path (processes, search, JSON), so CI tests the tool end to end without a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

from pretrain.bench.timing import comma_list, device_name
from pretrain.errors import UserError

ARCHS = ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224")
DRY_RUN = dict(arch="vit_micro_patch4_32", num_classes=10, start=8, max_batch=256, limit_mib=160, ranks="2,4")
"""`bench gpu`'s tiny model (its DRY_RUN `more` gives MAE a 1 x 64 decoder) and a limit on the growth of the
resident set that the probes cross between batch 8 and 256 on the CPU."""
OOM_MESSAGES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA error: out of memory")
"""Allocation failures CUDA libraries raise as a plain RuntimeError rather than torch.OutOfMemoryError."""
LAYOUT = "autocast"  # the probes' precision: deepspeed.precision=bf16, bf16_mode autocast (bench gpu's)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("memory")
    g.add_argument("--memory-archs", default=",".join(ARCHS))
    g.add_argument("--memory-kinds", default="supervised,mae", help="of supervised, mae")
    g.add_argument("--memory-ckpt", default="off,on", help="activation checkpointing (model.grad_checkpointing): "
                   "off, on or both; all archs and kinds run with the first value before any with the second")
    g.add_argument("--memory-start", type=int, default=None,
                   help=f"the first micro-batch probed (default 64; --memory-dry-run: {DRY_RUN['start']})")
    g.add_argument("--memory-max-batch", type=int, default=None,
                   help=f"the search stops when this fits (default 16384; --memory-dry-run: {DRY_RUN['max_batch']})")
    g.add_argument("--memory-refine", type=int, default=1, help="midpoints probed once fit and fail are 2x apart")
    g.add_argument("--memory-steps", type=int, default=2, help="steps per timed round of a probe (after 1 + "
                   "this many warm-up steps: the optimizer's states exist from the first)")
    g.add_argument("--memory-probe-s", type=float, default=150.0, help="a probe's time limit")
    g.add_argument("--memory-budget-s", type=float, default=3600.0, help="no probe starts that could end past this")
    g.add_argument("--memory-limit-mib", type=float, default=None,
                   help="a simulated memory limit: a probe whose peak exceeds it counts as out of memory "
                        f"(default: the device's own; --memory-dry-run: {DRY_RUN['limit_mib']})")
    g.add_argument("--memory-ranks", default="8,64", help="rank counts of the paper's ZeRO 1-3 columns")
    g.add_argument("--memory-dry-run", action="store_true",
                   help=f"{DRY_RUN['arch']} on the device at hand under a simulated limit: the whole path, no GPU")


@dataclass
class Probe:
    """One probe's outcome. fits: None when it erred (`error` says why: a crash, a time limit, the budget)."""
    batch: int
    fits: bool | None = None
    peak_bytes: float | None = None
    img_s: float | None = None
    capacity_bytes: float | None = None
    oom: str | None = None
    error: str | None = None
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------- the search
def largest_fit(probe: Callable[[int], Probe], start: int, max_batch: int, refine: int = 1,
                guess: Callable[[Probe], int | None] | None = None, probes: list[Probe] | None = None) -> list[Probe]:
    """Probes in the order run (appended to `probes` as they finish, so a caller interrupted keeps them); the
    answer is `outcome(probes)`. `guess(p)`: the batch a fitting probe's peak predicts fits (None: no guess)."""
    probes = [] if probes is None else probes

    def ask(b: int) -> Probe:
        probes.append(probe(b))
        return probes[-1]

    b = start
    while True:  # doubling (or the guess's jump) while probes fit, halving while they do not
        p = ask(b)
        if p.error:
            return probes
        lo, hi = outcome(probes)
        if (p.fits and (hi is not None or b >= max_batch)) or (not p.fits and (lo or b == 1)):
            break
        b = min(_next_up(b, guess(p) if guess else None), max_batch) if p.fits else b // 2
    while lo and hi and hi > 2 * lo:  # after a jump past the limit: bisect the powers of two in between
        p = ask(lo * 2 ** (int(math.log2(hi // lo)) // 2))
        if p.error:
            return probes
        lo, hi = outcome(probes)
    for _ in range(refine):
        if not (lo and hi) or hi - lo <= 1:
            break
        if ask((lo + hi) // 2).error:
            return probes
        lo, hi = outcome(probes)
    return probes


def _next_up(b: int, guess: int | None) -> int:
    """2b, or the largest power-of-two multiple of b at or below `guess` when that is larger."""
    if not guess or guess < 4 * b:
        return 2 * b
    return b * 2 ** int(math.log2(guess / b))


def outcome(probes: list[Probe]) -> tuple[int, int | None]:
    """(the largest batch that fit, 0 if none; the smallest that ran out of memory, None if none)."""
    lo = max((p.batch for p in probes if p.fits), default=0)
    hi = min((p.batch for p in probes if p.fits is False), default=None)
    return lo, hi


def stopped(probes: list[Probe]) -> str | None:
    return next((f"batch {p.batch}: {p.error}" for p in probes if p.error), None)


# ------------------------------------------------------------------------------------------ one probe, apart
def run_probe(spec: dict, timeout_s: float) -> Probe:
    """Run one probe in its own process; its last stdout line is the JSON result."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pretrain.bench.memory", "--probe", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Probe(spec["batch"], error=f"no result within the probe's limit of {timeout_s:.0f} s",
                     seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    result = _last_json(proc.stdout)
    if proc.returncode != 0 or result is None:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[-600:]
        return Probe(spec["batch"], error=f"probe process exited with {proc.returncode}: {tail}", seconds=seconds)
    return Probe(**result, seconds=seconds)


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def probe_main(spec: dict) -> dict:
    """In the probe's process: build, run and measure one configuration at one micro-batch."""
    import tempfile

    import torch

    from pretrain.bench import gpu
    from pretrain.bench.timing import bench_device, peak_bytes, reset_peak

    device = bench_device()
    variant = "mae" if spec["kind"] == "mae" else "ours"
    more = [*spec["more"], f"model.grad_checkpointing={str(spec['ckpt']).lower()}"]
    capacity = spec["limit_bytes"] or torch.cuda.get_device_properties(device).total_memory
    rss0 = reset_peak(device)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            measured = gpu.measure([variant], spec["arch"], spec["batch"], spec["num_classes"], more,
                                   spec["steps"], 1, device, tmp)
        peak = peak_bytes(device, rss0)
        if spec["limit_bytes"] and peak > spec["limit_bytes"]:
            raise torch.OutOfMemoryError(f"simulated: peak {peak / 2**20:.0f} MiB over the limit of "
                                         f"{spec['limit_bytes'] / 2**20:.0f} MiB")
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        return {"batch": spec["batch"], "fits": False, "capacity_bytes": capacity, "oom": str(e).splitlines()[0][:300]}
    return {"batch": spec["batch"], "fits": True, "peak_bytes": peak, "img_s": measured[variant][0],
            "capacity_bytes": capacity}


def out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or any(m in str(e) for m in OOM_MESSAGES)


# ------------------------------------------------------------------------------------------------ the rows
def configs(args) -> list[tuple[str, str, bool]]:
    """(arch, kind, checkpointing) in the order measured: every arch and kind with the first checkpointing
    value before any with the second."""
    archs = [DRY_RUN["arch"]] if args.memory_dry_run else comma_list(args.memory_archs)
    kinds, ckpts = comma_list(args.memory_kinds), comma_list(args.memory_ckpt)
    for k in kinds:
        if k not in ("supervised", "mae"):
            raise UserError(f"--memory-kinds: unknown kind {k!r}; choose from supervised, mae")
    for c in ckpts:
        if c not in ("off", "on"):
            raise UserError(f"--memory-ckpt: got {c!r}; give off, on or off,on")
    return [(a, k, c == "on") for c, a, k in itertools.product(ckpts, archs, kinds)]


def guess_of(params: int) -> Callable[[Probe], int | None]:
    """The batch a fitting probe predicts fits: its peak less the paper's ZeRO-0 model states, per sample."""
    from pretrain.bench.memory_model import fit_activations, largest_batch

    def guess(p: Probe) -> int | None:
        fit = fit_activations([(p.batch, p.peak_bytes)], params, LAYOUT)
        return largest_batch(p.capacity_bytes, params, 0, 1, fit, LAYOUT) or None

    return guess


def row_of(arch: str, kind: str, ckpt: bool, probes: list[Probe], counts: tuple[int, int], ranks: list[int],
           setup: dict) -> dict:
    """The configuration's row: the largest batch that fit, the probes, and the paper's per-rank figures."""
    from pretrain.bench.memory_model import fit_activations, largest_batch, model_state_bytes, per_rank_bytes

    params, largest = counts
    lo, hi = outcome(probes)
    best = next((p for p in probes if p.fits and p.batch == lo), None)
    row = {"name": f"memory {arch} {kind} ckpt {'on' if ckpt else 'off'}", "arch": arch, "kind": kind,
           "grad_checkpointing": ckpt, "ours": lo, "baseline": float("nan"), "unit": "largest micro-batch (ZeRO 0)",
           "ratio": float("nan"), "goal": "report", "met": None, "fails_at": hi, "stopped": stopped(probes),
           "peak_bytes": best and best.peak_bytes, "img_s": best and best.img_s,
           "capacity_bytes": next((p.capacity_bytes for p in probes if p.capacity_bytes), None),
           "params": params, "largest_layer_params": largest, "layout": LAYOUT,
           "probes": [dataclasses.asdict(p) for p in probes], "fit": None, "paper": {}, **setup}
    points = [(p.batch, p.peak_bytes) for p in probes if p.fits]
    if not points:
        return row
    fit = fit_activations(points, params, LAYOUT)
    row["fit"] = {"static_bytes": fit.static_bytes, "bytes_per_sample": fit.bytes_per_sample, "points": len(points)}
    for stage, n in itertools.product(range(4), ranks):
        row["paper"][f"zero{stage}@{n}"] = {
            "model_state_bytes": model_state_bytes(params, stage, n, LAYOUT, largest),
            "bytes_at_batch": per_rank_bytes(params, stage, n, lo, fit, LAYOUT, largest),
            "largest_batch": largest_batch(row["capacity_bytes"], params, stage, n, fit, LAYOUT, largest)}
    return row


def run(args: argparse.Namespace):
    """Yields each configuration's row as soon as its search ends (the harness rewrites the JSON after each)."""
    from pretrain.bench.gpu import DRY_RUN as GPU_DRY
    from pretrain.bench.memory_model import count_params
    from pretrain.bench.timing import bench_device

    device = bench_device()  # no CUDA context here: the probes' processes get the whole device
    if device.type != "cuda" and not args.memory_dry_run:
        raise UserError("bench memory needs a CUDA device; --memory-dry-run runs it with a tiny model and a "
                        "simulated limit on the CPU")
    dry = args.memory_dry_run
    limit_mib = args.memory_limit_mib if args.memory_limit_mib is not None else (DRY_RUN["limit_mib"] if dry else None)
    start = args.memory_start or (DRY_RUN["start"] if dry else 64)
    max_batch = args.memory_max_batch or (DRY_RUN["max_batch"] if dry else 16384)
    num_classes, more = (DRY_RUN["num_classes"], GPU_DRY["more"]) if dry else (1000, [])
    ranks = [int(n) for n in comma_list(DRY_RUN["ranks"] if dry else args.memory_ranks)]
    setup = {"device": device_name(device), "zero_stage": 0,
             "precision": "bf16 (autocast)", "steps": args.memory_steps, "dry_run": dry,
             "limit_bytes": limit_mib * 2**20 if limit_mib else None}
    deadline = time.monotonic() + args.memory_budget_s
    for arch, kind, ckpt in configs(args):
        counts = count_params(arch, kind, [f"model.num_classes={num_classes}", *more])
        spec = {"arch": arch, "kind": kind, "ckpt": ckpt, "num_classes": num_classes, "more": more,
                "steps": args.memory_steps, "limit_bytes": setup["limit_bytes"]}
        probes: list[Probe] = []
        try:
            largest_fit(lambda b: _budgeted(dict(spec, batch=b), args.memory_probe_s, deadline), start, max_batch,
                        args.memory_refine, guess_of(counts[0]), probes)
        except KeyboardInterrupt:
            probes.append(Probe(0, error="interrupted"))
            yield row_of(arch, kind, ckpt, probes, counts, ranks, setup)
            raise
        _say(arch, kind, ckpt, probes)
        yield row_of(arch, kind, ckpt, probes, counts, ranks, setup)
        if time.monotonic() >= deadline:
            print(f"bench memory: --memory-budget-s {args.memory_budget_s:.0f} spent", file=sys.stderr, flush=True)
            return


def _budgeted(spec: dict, probe_s: float, deadline: float) -> Probe:
    left = deadline - time.monotonic()
    if left < min(probe_s, 10.0):
        return Probe(spec["batch"], error="the budget (--memory-budget-s) is spent")
    return run_probe(spec, min(probe_s, left))


def _say(arch: str, kind: str, ckpt: bool, probes: list[Probe]) -> None:
    lo, hi = outcome(probes)
    seen = ", ".join(f"{p.batch}{'+' if p.fits else '-' if p.fits is False else '!'}" for p in probes)
    print(f"   {arch} {kind} ckpt {'on' if ckpt else 'off'}: largest fit {lo}, fails at {hi} ({seen})"
          + (f"; stopped: {stopped(probes)}" if stopped(probes) else ""), file=sys.stderr, flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="one probe of `bench memory` (run by it, in a process of its own)")
    p.add_argument("--probe", required=True, help="the probe's spec as JSON")
    import pretrain._compat  # noqa: F401  before timm: importable on a CPU-only torch

    print(json.dumps(probe_main(json.loads(p.parse_args().probe))), flush=True)
