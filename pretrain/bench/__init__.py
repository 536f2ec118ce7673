"""`vit-pretrain bench [NAME ...]`: each benchmark times ours and a baseline in the same run.

Sub-benchmarks live in `pretrain/bench/<name>.py`, each with `add_arguments(parser)` (its own
options, prefixed with its name) and `run(args) -> dict | list[dict]`, each row with at least
{"name", "ours", "baseline", "unit", "ratio", "goal", "met"}; this module prints a table and
writes all results as JSON.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

BENCHMARKS = ["loader", "step", "mae", "options", "zero", "gpu"]


def _module(name: str):
    return importlib.import_module(f"pretrain.bench.{name}")


def _available() -> list[str]:
    out = []
    for name in BENCHMARKS:
        try:
            _module(name)
            out.append(name)
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("pretrain.bench"):
                raise
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all CPU ones of {BENCHMARKS})")
    parser.add_argument("--json", default="bench.json", help="where to write all results")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    for name in _available():
        _module(name).add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pretrain.errors import UserError

    available = _available()
    names = args.names or [n for n in available if n != "gpu"]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise UserError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    results = []
    for name in names:
        if name not in available:
            raise UserError(f"benchmark {name!r} is not available in this build")
        print(f"== bench {name}", file=sys.stderr, flush=True)
        out = _module(name).run(args)
        results.extend(out if isinstance(out, list) else [out])
    print(format_table(results))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    return 0


def format_table(results: list[dict]) -> str:
    rows = [("benchmark", "ours", "baseline", "unit", "ratio", "goal", "met")]
    for r in results:
        rows.append((r["name"], f"{r['ours']:.4g}", f"{r['baseline']:.4g}", r["unit"], f"{r['ratio']:.3f}",
                     str(r.get("goal", "")), {True: "yes", False: "NO", None: "-"}[r.get("met")]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
