"""`vit-pretrain bench [NAME ...]`: each benchmark times ours and a baseline in the same run.

Sub-benchmarks live in `pretrain/bench/<name>.py`, each with `add_arguments(parser)` (its own
options, prefixed with its name) and `run(args) -> dict | list[dict]` (or a generator of rows: the JSON
is rewritten after each), each row with at least {"name", "ours", "baseline", "unit", "ratio", "goal",
"met"}; this module prints a table and writes all results as JSON. Every benchmark runs on the main install (`scripts/setup.sh`); one that
needs an optional module says in one line which extra installs it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

BENCHMARKS = ["loader", "step", "mae", "options", "zero", "gpu", "feed", "memory"]
GPU_ONLY = ("gpu", "feed", "memory")
"""Not in a plain `vit-pretrain bench`: each refuses without CUDA unless asked for its dry run."""
EXTRAS = {"s3fs": "s3", "pyarrow": "parquet", "gcsfs": "gcs", "aiohttp": "http", "transformers": "hf",
          "skimage": "dev", "moto": "dev", "pytest": "dev"}
"""Optional modules -> the extra (pyproject.toml) that installs them."""
_MISSING: dict[str, ModuleNotFoundError] = {}  # benchmark -> the optional module its import lacked


def _module(name: str):
    return importlib.import_module(f"pretrain.bench.{name}")


def _available() -> list[str]:
    """Benchmarks of this build whose module imports (one lacking an optional module is recorded)."""
    out = []
    for name in BENCHMARKS:
        try:
            _module(name)
            out.append(name)
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("pretrain"):
                _MISSING[name] = e
    return out


def _needs(name: str, e: ModuleNotFoundError):
    """The one-line error for a benchmark that lacks an optional module."""
    from pretrain.errors import UserError

    top = (e.name or str(e)).split(".")[0]
    how = f"pip install 'vit-pretrain[{EXTRAS[top]}]'" if top in EXTRAS else f"pip install {top}"
    return UserError(f"bench {name} needs {top}, which is not installed: {how}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*",
                        help=f"benchmarks to run (default: all but {', '.join(GPU_ONLY)} of {BENCHMARKS})")
    parser.add_argument("--json", default="bench.json", help="where to write all results")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    for name in _available():
        _module(name).add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pretrain.errors import UserError

    available = _available()
    names = args.names
    if not names:
        names = [n for n in available if n not in GPU_ONLY]
        for name, e in _MISSING.items():
            print(f"bench {name} skipped: {_needs(name, e)}", file=sys.stderr)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise UserError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    results = []
    for name in names:
        if name in _MISSING:
            raise _needs(name, _MISSING[name])
        if name not in available:
            raise UserError(f"benchmark {name!r} is not available in this build")
        print(f"== bench {name}", file=sys.stderr, flush=True)
        try:
            out = _module(name).run(args)
            for row in [out] if isinstance(out, dict) else out:  # a list, or a generator yielding as it goes
                results.append(row)
                _write(args.json, results)
        except ModuleNotFoundError as e:  # an optional module imported where it is used
            if (e.name or "").startswith("pretrain"):
                raise
            raise _needs(name, e) from None
    print(format_table(results))
    _write(args.json, results)
    return 0


def _write(path: str, results: list[dict]) -> None:
    """All rows so far, replaced whole (written beside, then renamed), so a run cut short keeps what it measured."""
    import os

    with open(f"{path}.tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(f"{path}.tmp", path)


def format_table(results: list[dict]) -> str:
    rows = [("benchmark", "ours", "baseline", "unit", "ratio", "goal", "met")]
    for r in results:
        rows.append((r["name"], f"{r['ours']:.4g}", f"{r['baseline']:.4g}", r["unit"], f"{r['ratio']:.3f}",
                     str(r.get("goal", "")), {True: "yes", False: "NO", None: "-"}[r.get("met")]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
