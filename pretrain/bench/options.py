"""`bench options`: the supervised training step of each architecture option against the plain ViT, and
patch dropout's speed-up (0.5 and 0.75 against none), all timed interleaved in one run.

Each contender is the bare training step (`bench step`'s baseline loop: timm model, AdamW, cross-entropy,
same uint8 batch), so the ratios are the model's own cost, not the engine's.
"""
from __future__ import annotations

import argparse

from pretrain.bench.timing import bench_device, device_sync, interleaved, median

# row name -> config overrides; "plain" is every row's baseline
OPTIONS = {
    "patch_drop=0.5": ["model.patch_drop_rate=0.5"],
    "patch_drop=0.75": ["model.patch_drop_rate=0.75"],
    "reg_tokens=4": ["model.reg_tokens=4"],
    "init_values=1e-5": ["model.init_values=1e-5"],
    "qk_norm": ["model.qk_norm=true"],
    "mlp=swiglu (ratio 5.33)": ["model.mlp=swiglu", "model.mlp_ratio=5.3334"],  # GELU-at-4 parameters
    "pos_embed=none": ["model.pos_embed=none"],
    "rope": ["model.rope=true"],
    "conv_stem": ["model.conv_stem=true"],
    "dynamic_img_size": ["model.dynamic_img_size=true"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("options")
    g.add_argument("--options-arch", default="vit_tiny_patch16_224")
    g.add_argument("--options-img-size", type=int, default=112)
    g.add_argument("--options-batch", type=int, default=32)
    g.add_argument("--options-steps", type=int, default=3, help="steps per timed round")
    g.add_argument("--options-rounds", type=int, default=4)


def run(args: argparse.Namespace) -> list[dict]:
    import tempfile

    from pretrain.bench.step import bench_config, build_baseline, synthetic_batch

    device = bench_device()
    num_classes, n = 10, args.options_steps
    images, labels = synthetic_batch(args.options_batch, args.options_img_size, num_classes)
    contenders = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in {"plain": [], **OPTIONS}.items():
            cfg = bench_config(args.options_arch, args.options_img_size, args.options_batch, 0, "supervised", tmp,
                               extra)
            step = build_baseline(cfg, images, labels, num_classes, device)
            contenders[name] = (lambda s: lambda: [s() for _ in range(n)])(step)
    times = interleaved(contenders, rounds=2 if args.quick else args.options_rounds, sync=device_sync(device))
    plain = median(times["plain"]) / n
    setup = f"{args.options_arch} img {args.options_img_size} batch {args.options_batch} {device}, bare step"
    rows = []
    for name in OPTIONS:
        t = median(times[name]) / n
        rows.append({"name": f"options: {name}", "ours": t, "baseline": plain, "unit": "s/step",
                     "ratio": t / plain, "goal": "report", "met": None, "setup": setup,
                     "rounds": {name: times[name], "plain": times["plain"]}})
    return rows
