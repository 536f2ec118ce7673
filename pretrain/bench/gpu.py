"""`bench gpu`: images/s and MFU of our Trainer on one GPU, bf16, against the timm model in a plain loop,
every variant a flag of this one command and every pair timed interleaved in the same process.

Variants (`--gpu-variants`): `timm` (the bare loop of `bench step`: the timm model, our fused AdamW with our
weight-decay groups, our input path: the pinned uint8 batch copied and normalised every step), `timm_compiled`
(that loop with the whole model under torch.compile, as timm's train.py --torchcompile), `ours` / `ours_compiled`
(the Trainer, supervised, model.compile off / on) and `mae` / `mae_compiled`. `--gpu-attention` adds ours with
`model.attention_backend=<X>`. Each row compares like with like: ours with the timm loop and MAE with ours
supervised, eager with eager and compiled with compiled (BASELINE). Eager and compiled variants form two
groups, each built, timed (ABBA rounds) and freed before the next; the rows of a group are yielded as soon as
it is measured, so the JSON of a run cut short keeps them. A group that runs out of memory is retried at half
the batch, so a large `--gpu-batch` finds the largest batch that fits (the row says which it ran).

MFU is against one basis: the GPU's dense bf16 peak by name (`pretrain.engine.metrics.PEAK_FLOPS`).
`--gpu-dry-run` runs the whole command with a tiny model for a few steps on the device at hand (the CPU without
CUDA), so the command path is tested without a GPU.
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time

import torch

from pretrain.bench.step import bench_config, build_baseline, build_ours, synthetic_batch
from pretrain.bench.timing import bench_device, comma_list, device_name, device_sync, interleaved, median
from pretrain.errors import UserError

VARIANTS = ("timm", "timm_compiled", "ours", "ours_compiled", "mae", "mae_compiled")
BASELINE = {"ours": "timm", "ours_compiled": "timm_compiled", "mae": "ours", "mae_compiled": "ours_compiled"}
"""variant -> the variant its row compares with (an attention variant `ours@X` compares with `ours`)."""
ATTENTION = ("flash", "cudnn", "efficient", "math")
GOAL_MFU = {"base": 0.40, "large": 0.50}  # ours compiled, supervised, by the arch's size
GOAL_MAE = 1.6  # MAE img/s over supervised img/s
DRY_RUN = dict(arch="vit_micro_patch4_32", batch=8, steps=2, rounds=1, num_classes=10,
               more=["mae.decoder_embed_dim=64", "mae.decoder_depth=1", "mae.decoder_num_heads=4"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("gpu")
    g.add_argument("--gpu-archs", default="vit_base_patch16_224,vit_large_patch16_224")
    g.add_argument("--gpu-batch", default="256,512",
                   help="batch per arch (one value: all); a batch that runs out of memory is halved until it fits")
    g.add_argument("--gpu-variants", default=",".join(VARIANTS),
                   help=f"of {','.join(VARIANTS)}; the group (eager or compiled) named first runs first")
    g.add_argument("--gpu-attention", default="",
                   help=f"also time ours (and ours_compiled if chosen) with model.attention_backend=X, "
                        f"X of {','.join(ATTENTION)}")
    g.add_argument("--gpu-steps", type=int, default=10, help="steps per timed round")
    g.add_argument("--gpu-rounds", type=int, default=5)
    g.add_argument("--gpu-dry-run", action="store_true",
                   help=f"a tiny model ({DRY_RUN['arch']}, batch {DRY_RUN['batch']}, {DRY_RUN['steps']} steps) "
                        "on the device at hand: tests the command path without a GPU")


def variants(args) -> list[str]:
    """The chosen variants, each attention backend added after the supervised variants of ours."""
    chosen, backends = comma_list(args.gpu_variants), comma_list(args.gpu_attention)
    for v in chosen:
        if v not in VARIANTS:
            raise UserError(f"--gpu-variants: unknown variant {v!r}; choose from {','.join(VARIANTS)}")
    for b in backends:
        if b not in ATTENTION:
            raise UserError(f"--gpu-attention: unknown backend {b!r}; choose from {','.join(ATTENTION)}")
    return chosen + [f"{v}@{b}" for b in backends for v in ("ours", "ours_compiled") if v in chosen]


def baseline_of(variant: str) -> str | None:
    base, _, backend = variant.partition("@")
    return base if backend else BASELINE.get(variant)


def compiled(variant: str) -> bool:
    return variant.partition("@")[0].endswith("_compiled")


def groups(names: list[str]) -> list[list[str]]:
    """Eager and compiled variants apart, in the order their first member was named."""
    out: dict[bool, list[str]] = {}
    for v in names:
        out.setdefault(compiled(v), []).append(v)
    return list(out.values())


def build(variant: str, arch: str, batch: int, num_classes: int, more: list[str], out_dir: str, images, labels,
          device):
    """-> (step(n): n training steps, training FLOPs per image, what to close afterwards or None)."""
    base, _, backend = variant.partition("@")
    kind = "mae" if base.startswith("mae") else "supervised"
    extra = ["deepspeed.precision=bf16", f"model.num_classes={num_classes}", *more]
    extra += ["model.compile=true"] if compiled(variant) and not base.startswith("timm") else []
    extra += [f"model.attention_backend={backend}"] if backend else []
    cfg = bench_config(arch, images.shape[-1], batch, 0, kind, f"{out_dir}/{variant}", extra)
    if base.startswith("timm"):
        step = build_baseline(cfg, images, labels, num_classes, device, compile=compiled(variant))
        return (lambda n: [step() for _ in range(n)]), train_flops(cfg, num_classes), None
    trainer = build_ours(cfg, images, labels, num_classes)
    return trainer.train_steps, trainer.flops_per_image, trainer.log


def train_flops(cfg, num_classes: int) -> float:
    """Training FLOPs per image of the supervised model (3x forward), counted on a model with no storage."""
    from pretrain.models import create_model, flops_per_image, model_kwargs

    with torch.device("meta"):
        return 3.0 * flops_per_image(create_model(cfg.model.arch, **model_kwargs(cfg.model, num_classes)))


def measure(names, arch, batch, num_classes, more, steps, rounds, device, out_dir):
    """Build the group's variants, time each one's first call (the warm-up: compilation), then interleaved
    rounds. -> {variant: (img/s, training FLOPs per image, warm-up s, seconds per round)}."""
    from pretrain.models.archs import registered

    images, labels = synthetic_batch(batch, registered(arch)["img_size"], num_classes)
    sync = device_sync(device)
    built = {v: build(v, arch, batch, num_classes, more, out_dir, images, labels, device) for v in names}
    warmup = {}
    for v, (step, _, _) in built.items():
        t0 = time.perf_counter()
        step(1)
        sync()
        warmup[v] = time.perf_counter() - t0
    times = interleaved({v: (lambda s=s: s(steps)) for v, (s, _, _) in built.items()}, rounds=rounds, sync=sync)
    for _, _, log in built.values():
        if log is not None:
            log.close()
    return {v: (steps * batch / median(times[v]), built[v][1], warmup[v], times[v]) for v in names}


def rows_of(measured: dict, arch: str, batch: int, peak: float | None, setup: dict) -> list[dict]:
    """One row per variant: its img/s and MFU, and the ratio to its baseline when that was measured with it."""
    rows = []
    for v, (ips, flops, warm, rounds) in measured.items():
        base = baseline_of(v)
        b_ips, b_flops = measured[base][:2] if base in measured else (float("nan"), float("nan"))
        ratio = ips / b_ips
        mfu = ips * flops / peak if peak else None
        row = {"name": f"gpu {arch} {v}", "arch": arch, "variant": v, "batch": batch, "ours": ips,
               "baseline": b_ips, "baseline_variant": base, "unit": "img/s", "ratio": ratio, "mfu": mfu,
               "baseline_mfu": b_ips * b_flops / peak if peak and base in measured else None,
               # MFU ratio = img/s ratio x FLOP ratio (needs no peak); flop_ratio: baseline FLOPs over ours
               "mfu_ratio": ratio * flops / b_flops, "flop_ratio": b_flops / flops, "flops_per_image": flops,
               "warmup_s": warm, "rounds_s": rounds, **setup}
        row.update(goal(v, arch, row))
        rows.append(row)
    return rows


def goal(variant: str, arch: str, row: dict) -> dict:
    size = next((s for s in GOAL_MFU if f"_{s}_" in arch), None)
    mfu, ratio = row["mfu"], row["ratio"]
    if variant == "ours_compiled" and size:
        want = GOAL_MFU[size]
        if size == "base":
            return {"goal": f">= 1.0x timm_compiled, MFU >= {want}",
                    "met": None if mfu is None else bool(mfu >= want and ratio >= 1.0)}
        return {"goal": f"MFU >= {want}", "met": None if mfu is None else bool(mfu >= want)}
    if variant in ("mae", "mae_compiled"):
        return {"goal": f">= {GOAL_MAE}x {BASELINE[variant]} img/s",
                "met": None if math.isnan(ratio) else bool(ratio >= GOAL_MAE)}
    return {"goal": "baseline" if variant.startswith("timm") else "report", "met": None}


def run(args: argparse.Namespace):
    """Yields each group's rows as soon as it is measured (the harness rewrites the JSON after each)."""
    from pretrain.engine.metrics import peak_flops

    device = bench_device()
    if device.type != "cuda" and not args.gpu_dry_run:
        raise UserError("bench gpu needs a CUDA device; --gpu-dry-run runs it with a tiny model on the CPU, and "
                        "`vit-pretrain bench` runs the CPU benchmarks")
    names = variants(args)
    archs = comma_list(args.gpu_archs)
    batches = [int(b) for b in args.gpu_batch.split(",")]
    if len(batches) not in (1, len(archs)):
        raise UserError(f"--gpu-batch: give one batch or one per arch ({len(archs)}), got {args.gpu_batch!r}")
    batches = batches * len(archs) if len(batches) == 1 else batches
    steps, rounds, num_classes, more = args.gpu_steps, 2 if args.quick else args.gpu_rounds, 1000, []
    if args.gpu_dry_run:
        archs, batches = [DRY_RUN["arch"]], [DRY_RUN["batch"]]
        steps, rounds, num_classes, more = DRY_RUN["steps"], DRY_RUN["rounds"], DRY_RUN["num_classes"], DRY_RUN["more"]
    peak = peak_flops(device)
    setup = {"device": device_name(device),
             "peak_tflops": peak / 1e12 if peak else None, "precision": "bf16 (autocast)", "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, batch in zip(archs, batches):
            for group in groups(names):
                if any(compiled(v) for v in group):
                    torch._dynamo.reset()  # the graphs of earlier groups neither serve nor crowd this one's
                measured, batch = halving(
                    lambda b: measure(group, arch, b, num_classes, more, steps, rounds, device, tmp), batch,
                    f"gpu: {arch} {','.join(group)}")
                yield from rows_of(measured, arch, batch, peak, setup)
                del measured
                free_memory()


def halving(measure_at, batch: int, what: str):
    """measure_at(batch), the batch halved after each out-of-memory error until it fits -> (its result, batch)."""
    while True:
        try:
            return measure_at(batch), batch
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        print(f"bench {what} ran out of memory at batch {batch}; retrying at {batch // 2}", file=sys.stderr,
              flush=True)
        batch //= 2
        free_memory()  # out of the except block: the error's frames (and the tensors they hold) are gone


def free_memory() -> None:
    """Give back what the last measurement held: its objects, then the CUDA cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
