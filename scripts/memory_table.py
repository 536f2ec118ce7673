"""Print the paper table of docs/benchmarks.md "Memory table": model-state GiB per rank (parameters, gradients,
AdamW states; no activations) at ZeRO 0-3 on N ranks, from `pretrain.bench.memory_model`, parameters counted
on the meta device. Computed, not measured."""
import argparse

import pretrain._compat  # noqa: F401  before timm: importable on a CPU-only torch
from pretrain.bench.memory import ARCHS
from pretrain.bench.memory_model import LAYOUTS, paper_table


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ranks", default="8,64")
    ap.add_argument("--layout", default="autocast", choices=list(LAYOUTS))
    args = ap.parse_args()
    print("| architecture | task | params (M) | ranks | ZeRO 0 | ZeRO 1 | ZeRO 2 | ZeRO 3 |\n|---|---|---|---|---|---|---|---|")
    for r in paper_table(ARCHS, ranks=[int(n) for n in args.ranks.split(",")], layout=args.layout):
        gib = " | ".join(f"{b / 2**30:.2f}" for b in r["bytes"])
        print(f"| `{r['arch']}` | {r['kind']} | {r['params'] / 1e6:.1f} | {r['ranks']} | {gib} |")


if __name__ == "__main__":
    main()
