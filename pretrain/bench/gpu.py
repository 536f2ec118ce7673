"""`bench gpu` (CUDA only): images/s and MFU of our Trainer for ViT-B/16 and ViT-L/16, supervised and
MAE, bf16, one GPU, against a loop with the settings of timm's benchmark.py train mode (the same timm
model, torch.autocast bf16, SGD, cross-entropy; timm's script is not shipped in its wheel, so its
loop is restated here) in the same run. Goal: ViT-B/16 supervised at >= 45% MFU and >= timm's figure.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from pretrain.bench.step import bench_config, build_ours, synthetic_batch
from pretrain.bench.timing import interleaved, median
from pretrain.errors import UserError

GOAL_MFU = 0.45


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("gpu")
    g.add_argument("--gpu-archs", default="vit_base_patch16_224,vit_large_patch16_224")
    g.add_argument("--gpu-batch", type=int, default=256)
    g.add_argument("--gpu-steps", type=int, default=10)
    g.add_argument("--gpu-rounds", type=int, default=5)
    g.add_argument("--gpu-compile", action="store_true", help="model.compile=true for ours")
    g.add_argument("--gpu-bf16-ds", action=argparse.BooleanOptionalAction, default=True,
                   help="also time supervised training in DeepSpeed's bf16 mode (deepspeed.bf16_mode=deepspeed)")


def timm_style_loop(arch: str, images, labels, device):
    """timm benchmark.py's train step: timm model, bf16 autocast, SGD, CE; channels-last off (ViT)."""
    import pretrain._compat  # noqa: F401  before timm: makes it importable on a CPU-only torch
    import timm

    model = timm.create_model(arch, num_classes=1000).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = images.to(device).float().div_(255)
    y = labels.to(device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(args: argparse.Namespace) -> list[dict]:
    if not torch.cuda.is_available():
        raise UserError("bench gpu needs a CUDA device; run the CPU benchmarks with `vit-pretrain bench`")
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    from pretrain.engine.metrics import peak_flops

    device = torch.device("cuda", torch.cuda.current_device())
    peak = peak_flops(device)
    rows = []
    n = args.gpu_steps
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.gpu_archs.split(","):
            images, labels = synthetic_batch(args.gpu_batch, 224, 1000)
            extra = ["model.compile=true"] if args.gpu_compile else []
            variants = {"supervised": ("supervised", []), "mae": ("mae", [])}
            if args.gpu_bf16_ds:  # bf16 weights and gradients: the mode that halves gradient traffic
                variants["supervised bf16_ds"] = ("supervised", ["deepspeed.bf16_mode=deepspeed"])
            trainers = {name: build_ours(bench_config(arch, 224, args.gpu_batch, 0, kind, f"{tmp}/{arch}-{i}",
                                                      ["deepspeed.precision=bf16", "model.num_classes=1000",
                                                       *extra, *more]), images, labels, 1000)
                        for i, (name, (kind, more)) in enumerate(variants.items())}
            base = timm_style_loop(arch, images, labels, device)
            contenders = {name: (lambda t=t: t.train_steps(n)) for name, t in trainers.items()}
            times = interleaved({**contenders, "timm": lambda: [base() for _ in range(n)]},
                                rounds=2 if args.quick else args.gpu_rounds, sync=torch.cuda.synchronize)
            ips = {k: n * args.gpu_batch / median(v) for k, v in times.items()}
            for kind, t in trainers.items():
                mfu = ips[kind] * t.flops_per_image / peak if peak else float("nan")
                row = {"name": f"gpu {arch} {kind}", "ours": ips[kind], "baseline": ips["timm"], "unit": "img/s",
                       "ratio": ips[kind] / ips["timm"], "mfu": mfu, "device": torch.cuda.get_device_name(device),
                       "goal": f"MFU >= {GOAL_MFU}, >= timm" if kind == "supervised" else "report",
                       "met": (mfu >= GOAL_MFU and ips[kind] >= ips["timm"]) if kind == "supervised" else None,
                       "precision": t.precision.name + (" (DeepSpeed bf16 mode)" if t.precision.engine_bf16 else "")}
                rows.append(row)
                t.log.close()
            del trainers, base
            torch.cuda.empty_cache()
    return rows
