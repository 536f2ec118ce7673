"""`vit-pretrain eval WEIGHTS --data URLS`: top-1, top-5, loss and count as JSON, on one process or many."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from pretrain.errors import UserError
from pretrain.evaluation.evaluate import eval_stream, evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", help="exported .safetensors (its .json next to it) or a run directory")
    parser.add_argument("--data", required=True, help="labelled shards: brace pattern, glob, list or <split>.json")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch per process")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers per process")
    parser.add_argument("--out", default=None, help="also write the JSON here (any fsspec URL)")


def run(args: argparse.Namespace) -> int:
    from pretrain import dist as pdist

    return pdist.run_guarded(lambda: _evaluate_weights(args))


def _evaluate_weights(args: argparse.Namespace) -> int:
    import fsspec

    from pretrain import dist as pdist
    from pretrain.engine.consolidate import load_source
    from pretrain.weights import build_timm

    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    env = pdist.resolve()
    if env.world_size > 1:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's op-build chatter: stdout is the JSON
            pdist.setup()
    device = pdist.rank_device(env.local_rank)
    state, meta = load_source(args.weights)
    if not meta["timm_kwargs"].get("num_classes"):
        raise UserError(f"{args.weights} has no classifier head (an MAE encoder?): fine-tune or linear-probe "
                        "it first, or use the k-NN monitor")
    model = build_timm(meta, state).to(device)
    stream = eval_stream(args.data, meta, args.batch_size, args.workers, env.rank, env.world_size)
    result = evaluate(model, stream, device, mean=stream.data.mean, std=stream.data.std)
    result["weights"] = args.weights
    result["data"] = args.data
    if env.rank == 0:
        text = json.dumps(result, indent=2)
        sys.stdout.write(text + "\n")
        if args.out:
            with fsspec.open(args.out, "w") as f:
                f.write(text + "\n")
    pdist.teardown()
    return 0
