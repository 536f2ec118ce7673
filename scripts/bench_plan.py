"""What one rank computes to start (or resume) an epoch at scale, after chains of re-layouts, simulated on one CPU.

Every rank builds the epoch's plan (pretrain/data/plan.py) when it starts an epoch and when it resumes one;
after a resume on another layout, the plan holds one layer per layout the epoch has seen. This script builds a
synthetic shard list (counts only: nothing is read), cuts each layout at half of its batches, and times what
one rank does before its first batches: the plan, the ragged-step counts (`Layer.short_batches`) and, for each
of its worker slots, the positions and shards of the first shuffle block (what a data worker locates first).
Each measurement runs in a fresh process: seconds of that work, and its peak resident memory above the
process's memory before it (VmHWM, reset through /proc/self/clear_refs).

    python scripts/bench_plan.py                  # the new plan, 2 runs per cell (min-max)
    python scripts/bench_plan.py --old            # also the plan as of GIT_OLD (each cell stopped at --timeout)

Prints a markdown table (docs/scaling.md holds one).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GIT_OLD = "a80efb4d2fac4eaadd316ffcac5b5f8ee3fdfc88"  # the last plan whose re-layouts listed every segment
SEED, EPOCH, BLOCK = 0, 3, 2048  # run.seed, an epoch, data.shuffle_block (its default)
CORPORA = {"1e8": (10**8, 10**4, 512), "1e9": (10**9, 10**5, 4096)}  # samples, shards, ranks


def shard_counts(samples: int, shards: int) -> list[int]:
    """`shards` counts of about samples/shards each (+-10%), summing to `samples`."""
    mean = samples // shards
    counts = np.random.default_rng(0).integers(mean * 9 // 10, mean * 11 // 10 + 1, size=shards)
    counts[-1] += samples - counts.sum()
    return counts.tolist()


def scenarios(plan) -> list[tuple[str, str, list]]:
    """(corpus, phase, history) rows; each layout but the last cut at half of its batches (whole steps)."""
    rows = []
    for corpus, (samples, shards, ranks) in CORPORA.items():
        counts = shard_counts(samples, shards)
        full, half = plan.Layout(ranks, 8, 256, BLOCK), plan.Layout(ranks // 2, 8, 256, BLOCK)
        chains = [(f"{ranks}x8 b256", [full]), (f"{ranks} -> {ranks // 2}", [full, half]),
                  (f"{ranks} -> {ranks // 2} -> {ranks}", [full, half, full])]
        if corpus == "1e9":
            chains.append(("4096x8 b256 -> 2048x8 b192 -> 3000x6 b192 accum 2 -> 4096x8 b256",
                           [full, plan.Layout(2048, 8, 192, BLOCK), plan.Layout(3000, 6, 192, BLOCK, 2), full]))
        for phase, layouts in chains:
            history = []
            for i, lay in enumerate(layouts):
                cut = 0
                if i < len(layouts) - 1:
                    bpr = plan.EpochPlan(counts, SEED, EPOCH, history + [(lay, 0)]).layers[-1].batches_per_rank
                    cut = bpr // 2 // lay.accum * lay.accum
                history.append((lay, cut))
            rows.append((corpus, phase, [(lay.to_dict(), n) for lay, n in history]))
    return rows


def load_plan(old: bool):
    if not old:
        from pretrain.data import plan
        return plan
    src = subprocess.run(["git", "show", f"{GIT_OLD}:pretrain/data/plan.py"], cwd=REPO, capture_output=True,
                         text=True)
    if src.returncode:
        sys.exit(f"--old needs the git history of {REPO} (commit {GIT_OLD[:12]}): {src.stderr.strip()}")
    mod = types.ModuleType("old_plan")
    sys.modules["old_plan"] = mod  # dataclasses look their module up
    exec(compile(src.stdout, "old_plan.py", "exec"), mod.__dict__)
    return mod


def rank_startup(plan, counts: list[int], history: list, rank: int, old: bool) -> dict:
    """What `rank` computes before its first batches: the plan, the ragged-step counts, and for each of its
    worker slots the shards and indices of the first shuffle block (TrainStream.iter_epoch_weighted and
    _TrainSlots.__iter__)."""
    ep = plan.EpochPlan(counts, SEED, EPOCH, history)
    layer = ep.layers[-1]
    short = layer.short_batches()
    for w in range(layer.layout.workers):
        v0, batches, slot = layer.slot(rank, w)
        done = layer.consumed(w, history[-1][1]) * layer.layout.batch_size
        j, start, stop = plan.block_at(layer.blocks(batches), done)
        need = np.sort(layer.block_perm(slot, j, stop - start))
        if old:
            ep.locate(plan.seg_points(layer.slot_segs(rank, w), need + start))
        else:
            ep.locate(layer.points(v0 + start + need))
    if len(ep.layers) == 1:
        held = "-"  # the first layer splits 0..N-1
    elif old:
        held = f"{sum(len(l.seq) for l in ep.layers[1:]):,} segments"
    else:
        held = f"{sum(len(l.seq.cum) - 1 for l in ep.layers[1:]):,} old slots"
    return {"held": held, "short": len(short), "batches": layer.batches_per_rank}


def _memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(spec: dict) -> None:
    plan = load_plan(spec["old"])
    samples, shards, _ = CORPORA[spec["corpus"]]
    counts = shard_counts(samples, shards)
    history = [(plan.Layout(**lay), n) for lay, n in spec["history"]]

    def stop(*_):
        print(json.dumps({"timeout": spec["timeout"]}), flush=True)
        os._exit(0)  # now, even inside the old plan's loops

    signal.signal(signal.SIGALRM, stop)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _memory_kb("VmRSS")
    signal.alarm(spec["timeout"])  # counts the measured work only, not the start-up (imports)
    t0 = time.perf_counter()
    out = rank_startup(plan, counts, history, spec["rank"], spec["old"])
    out["s"] = time.perf_counter() - t0
    out["mb"] = (_memory_kb("VmHWM") - before) / 1024
    print(json.dumps(out))


def measure(spec: dict) -> dict:
    got = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if got.returncode:
        sys.exit(f"measuring {spec['corpus']} {spec['rank']} failed:\n{got.stderr[-3000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"


def cell(runs: list[dict]) -> tuple[str, str]:
    """(seconds, MB) over runs, as a range."""
    if any("timeout" in r for r in runs):
        return f"> {runs[0]['timeout']:.0f} s (stopped)", "-"
    return span([r["s"] for r in runs], ".3f"), span([r["mb"] for r in runs], ".0f")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", action="store_true", help=f"also measure the plan as of commit {GIT_OLD[:12]}")
    ap.add_argument("--runs", type=int, default=2, help="fresh processes per cell; the table gives min-max")
    ap.add_argument("--timeout", type=int, default=180, help="seconds of measured work before a cell is stopped")
    ap.add_argument("--corpus", choices=sorted(CORPORA), nargs="*", default=sorted(CORPORA))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(json.loads(a.child))
    from pretrain.data import plan

    print(f"load average (1, 5, 15 min) before: {load_average()}", file=sys.stderr)
    head = "| corpus | layouts (ranks x workers, batch; each but the last cut at half its batches) | rank | layers | batches/rank | remainders hold | s | peak MB |"
    rule = "|---|---|---|---|---|---|---|---|"
    if a.old:
        head += " old: remainder holds | old: s | old: peak MB |"
        rule += "---|---|---|"
    print(head + "\n" + rule)
    stopped = set()  # (corpus, rank) whose old plan was stopped: later phases only add layers
    for corpus, phase, history in scenarios(plan):
        if corpus not in a.corpus:
            continue
        ranks = history[-1][0]["world_size"]
        for rank in (0, ranks - 1):
            spec = {"corpus": corpus, "history": history, "rank": rank, "old": False, "timeout": a.timeout}
            runs = [measure(spec) for _ in range(a.runs)]
            s, mb = cell(runs)
            samples, shards, _ = CORPORA[corpus]
            row = (f"| 10^{len(str(samples)) - 1} samples, {shards:,} shards | {phase} | {rank} | "
                   f"{len(history)} | {runs[0].get('batches', '-')} | {runs[0].get('held', '-')} | {s} | {mb} |")
            if a.old:
                if (corpus, rank) in stopped:
                    row += f" - | > {a.timeout:.0f} s (not run: an earlier phase was stopped) | - |"
                else:
                    old = []
                    while len(old) < a.runs and not any("timeout" in r for r in old):
                        old.append(measure({**spec, "old": True}))
                    if "timeout" in old[-1]:
                        stopped.add((corpus, rank))
                    s, mb = cell(old)
                    row += f" {old[0].get('held', '-')} | {s} | {mb} |"
            print(row, flush=True)
    print(f"load average (1, 5, 15 min) after: {load_average()}", file=sys.stderr)


if __name__ == "__main__":
    main()
