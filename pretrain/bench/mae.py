"""`bench mae`: an MAE step against a supervised step on the same encoder, both through our Trainer,
compared with their FLOP ratio (from the models' FLOP counts). Goal: the measured speed-up is at
least 75% of the FLOP ratio (ViT-B/16 with the standard 8x512 decoder: about 1.8x fewer FLOPs)."""
from __future__ import annotations

import argparse
import tempfile

from pretrain.bench.step import bench_config, build_ours, synthetic_batch
from pretrain.bench.timing import bench_device, device_sync, interleaved, median

GOAL_FRACTION = 0.75


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mae")
    g.add_argument("--mae-arch", default="vit_base_patch16_224")
    g.add_argument("--mae-img-size", type=int, default=224)
    g.add_argument("--mae-batch", type=int, default=8)
    g.add_argument("--mae-steps", type=int, default=2, help="steps per timed round")
    g.add_argument("--mae-rounds", type=int, default=3)


def run(args: argparse.Namespace) -> dict:
    bench_device()
    num_classes = 10
    batch = 4 if args.quick else args.mae_batch
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = synthetic_batch(batch, args.mae_img_size, num_classes)
        trainers = {}
        for kind in ("supervised", "mae"):
            cfg = bench_config(args.mae_arch, args.mae_img_size, batch, 0, kind, f"{tmp}/{kind}")
            trainers[kind] = build_ours(cfg, images, labels, num_classes)
        device = trainers["mae"].device
        sync = device_sync(device)
        n = args.mae_steps
        times = interleaved({k: (lambda t=t: t.train_steps(n)) for k, t in trainers.items()},
                            rounds=2 if args.quick else args.mae_rounds, sync=sync)
        flops = {k: t.flops_per_image for k, t in trainers.items()}
        for t in trainers.values():
            t.log.close()
    sup, mae = median(times["supervised"]) / n, median(times["mae"]) / n
    speedup = sup / mae
    flop_ratio = flops["supervised"] / flops["mae"]
    fraction = speedup / flop_ratio
    return {"name": "mae", "ours": mae, "baseline": sup, "unit": "s/step (mae vs supervised)", "ratio": speedup,
            "goal": f">= {GOAL_FRACTION:.2f} x FLOP ratio {flop_ratio:.2f} = {GOAL_FRACTION * flop_ratio:.2f}",
            "met": fraction >= GOAL_FRACTION, "flop_ratio": flop_ratio, "fraction_of_flop_ratio": fraction,
            "setup": f"{args.mae_arch} img {args.mae_img_size} batch {batch} {trainers['mae'].precision.name} {device}",
            "rounds": times}
