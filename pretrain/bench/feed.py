"""`bench feed`: our Trainer fed from real JPEG shards against the same Trainer on synthetic in-memory batches,
in one run. Recipes: ViT-B/16 supervised with the DeiT recipe's augmentations (RandAugment, colour jitter,
random erasing, Mixup/CutMix) and MAE-B (crop + flip), each read from full-size shards and from shards
pre-resized with the writer's `--max-side`, with `data.decode=cpu` and, on CUDA where the recipe allows it
(no host-only augmentation), `gpu`; each at one or more `data.workers` counts. One process, ZeRO 0, the
recipe's precision; eager unless `--feed-compile`.

Shards: photo-like images (smooth gradients, blurred shapes, fine texture, mild noise; 500x375 or 375x500, JPEG
quality 90), DISTINCT of them generated once into `--feed-dir` and repeated up to `--feed-images`, written by
the real writer (`write_shards`) full-size and with `max_side`; a later run with the same settings reuses them.

Each row times one continuous window of the Trainer's steps (`Trainer.train_steps`), after a warm-up. A fed
Trainer's workers fill their queues (up to about 2 x workers + 1 batches: `buffer_batches`) while its first
step warms up; so the warm-up goes on (at most `--feed-drain` more steps) until a step waits for data longer
than the steps before it did, the sign that the queues ran dry (`drained`). A row with `drained` false either
kept up throughout or may still have drawn on that buffer: its ratio is then an upper bound. Synthetic windows
(bench step's MemoryStream: one fixed uint8 batch) take the fixed warm-up only. Data wait: the Trainer's own
(`Trainer.data_wait_s`, the time its step waits for the next batch). Cores: CPU seconds of this process and
all its children (the data workers) over the timed window, per wall second.

`--feed-dry-run` runs the same path on the device at hand with a micro model and tiny shards (CI's end-to-end
test). Every figure of a CPU run is a smoke test of the command, never a GPU figure.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pretrain.bench.gpu import DRY_RUN as GPU_DRY_RUN, free_memory, halving
from pretrain.bench.step import BENCH, build_ours, synthetic_batch
from pretrain.bench.timing import bench_device, comma_list, device_name, device_sync
from pretrain.errors import UserError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"
RECIPES = {"deit": "supervised_vit_base_patch16_deit.yaml", "mae": "mae_vit_base_patch16.yaml"}
GOAL = {"deit": 0.95, "mae": 0.90}  # fed img/s over synthetic img/s on the GPU (issue 20)
SHARDS = ("full", "resized")
DECODES = ("cpu", "gpu")
CLASSES = 10
DISTINCT = 1024  # generated photos; the shards repeat them up to --feed-images
DRY_RUN = dict(arch=GPU_DRY_RUN["arch"], img_size=32, batch=8, images=64, size=(80, 60), max_side=40, steps=3,
               warmup=1, drain=2, more=GPU_DRY_RUN["more"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("feed")
    g.add_argument("--feed-recipes", default="deit,mae", help=f"of {','.join(RECIPES)}, run in this order")
    g.add_argument("--feed-shards", default="full,resized",
                   help="full-size shards, pre-resized ones (--feed-max-side), or both, in this order")
    g.add_argument("--feed-decode", default="cpu,gpu",
                   help="data.decode modes, in this order; gpu runs on CUDA only, for recipes without "
                        "host-only augmentations (MAE, not DeiT)")
    g.add_argument("--feed-workers", default="",
                   help="data.workers, or several (e.g. 14,4: a row each, in this order; default: the usable cores "
                        "minus 2, for one GPU's trainer process)")
    g.add_argument("--feed-batch", type=int, default=256, help="micro-batch (halved if it runs out of memory)")
    g.add_argument("--feed-steps", type=int, default=30, help="timed steps per row")
    g.add_argument("--feed-warmup", type=int, default=5, help="steps before the timed window")
    g.add_argument("--feed-drain", type=int, default=40,
                   help="at most this many more warm-up steps, until a fed step waits for data")
    g.add_argument("--feed-images", type=int, default=8192, help="images in the shards")
    g.add_argument("--feed-max-side", type=int, default=320,
                   help="longer side of the pre-resized shards (320: 320x240, the shorter side above 224)")
    g.add_argument("--feed-compile", action="store_true",
                   help="model.compile=true (each row's Trainer compiles anew: about a minute each on a GPU)")
    g.add_argument("--feed-dir", default=os.path.join(tempfile.gettempdir(), "vit_pretrain_feed"),
                   help="where the generated images and shards are kept between runs")
    g.add_argument("--feed-dry-run", action="store_true",
                   help=f"a micro model ({DRY_RUN['arch']}, batch {DRY_RUN['batch']}) on {DRY_RUN['images']} "
                        "tiny images, on the device at hand: tests the command path without a GPU")


# ----------------------------------------------------------------------------- shards


def photo(seed: int, size: tuple[int, int]):
    """A photo-like RGB image of `size` (w, h): a lit two-colour gradient, low-frequency colour, blurred
    shapes, fine texture and mild sensor noise (~44 KB at 500x375, quality 90; ImageNet's JPEGs average ~110 KB)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = x * np.cos(angle) + y * np.sin(angle)
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    c0, c1 = rng.uniform(0, 255, (2, 3))
    img = c0 + (c1 - c0) * t[..., None]  # (H, W, 3)
    light = 1.15 - 0.6 * np.hypot(x - rng.uniform(0, w), y - rng.uniform(0, h)) / max(w, h)
    img = img * light[..., None] * 0.8 + _upsampled(rng, (6, 8), (w, h), Image.BICUBIC) * 0.25
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(3, 9)):
        x0, x1 = sorted(rng.integers(0, w, 2))
        y0, y1 = sorted(rng.integers(0, h, 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=fill)
        else:
            draw.polygon([tuple(int(v) for v in p) for p in rng.uniform((0, 0), (w, h), (3, 2))], fill=fill)
    pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.7, 2.0)))
    texture = _upsampled(rng, (h // 8, w // 8), (w, h), Image.BILINEAR) - 128.0  # detail at ~8 px, on everything
    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * 5.0
    return Image.fromarray((np.asarray(pil, np.float32) + texture / 8 + noise).clip(0, 255).astype(np.uint8))


def _upsampled(rng, grid: tuple[int, int], size: tuple[int, int], resample) -> np.ndarray:
    """Uniform random colours on a (rows, cols) grid, resized to `size` (w, h) -> (h, w, 3) float32."""
    from PIL import Image

    small = Image.fromarray(rng.uniform(0, 255, (*grid, 3)).astype(np.uint8))
    return np.asarray(small.resize(size, resample), np.float32)


def _save_photo(job: tuple) -> None:
    path, seed, size = job
    photo(seed, size).save(path, "JPEG", quality=90)


def make_photos(root: str, n: int, size: tuple[int, int], workers: int) -> str:
    """An image folder (CLASSES sub-folders) of n photo-like JPEGs, 7 in 10 landscape (`size`), the rest
    portrait: DISTINCT generated ones, the rest hard links to them (a repeat costs the loader as much and
    takes no time to make); those already there are kept (each image is a function of its index)."""
    import multiprocessing

    def path(i: int) -> str:
        return f"{root}/c{i % CLASSES}/{i:06d}.jpg"

    for c in range(CLASSES):
        os.makedirs(f"{root}/c{c}", exist_ok=True)
    jobs = [(path(i), i, size if i % 10 < 7 else size[::-1]) for i in range(min(n, DISTINCT))
            if not os.path.exists(path(i))]
    if workers > 1 and len(jobs) > 64:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(_save_photo, jobs, chunksize=16)
    else:
        for job in jobs:
            _save_photo(job)
    for i in range(DISTINCT, n):
        if not os.path.exists(path(i)):
            os.link(path(i % DISTINCT), path(i))
    return root


def feed_shards(root: str, n: int, size: tuple[int, int], max_side: int, workers: int) -> dict[str, dict]:
    """Full-size and pre-resized shards of the generated photos, written once under root (the writer resumes:
    a finished set is only read back) -> {"full"|"resized": {"index", "shard_bytes_per_image", "image"}}."""
    from pretrain.data.writer import write_shards

    base = f"{root}/{n}_{size[0]}x{size[1]}"
    photos = make_photos(f"{base}/photos", n, size, workers)
    out = {}
    for name, side in (("full", 0), ("resized", max_side)):
        res = write_shards(photos, f"{base}/{name}{side or ''}", samples_per_shard=1024, max_side=side, quality=90,
                           workers=workers)
        train = res["splits"]["train"]
        image = f"{size[0]}x{size[1]}" if not side else f"max side {side}"
        out[name] = {"index": train["index"], "shard_bytes_per_image": sum(train["bytes"]) / train["num_samples"],
                     "image": image}
    return out


# ----------------------------------------------------------------------------- measuring


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def tree_cpu_s() -> dict[int, float]:
    """{pid: user + system CPU seconds} of this process and every process below it (the data workers)."""
    import psutil  # a dependency of DeepSpeed

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:  # a process that just ended
            pass
    return out


def recipe_config(recipe: str, out_dir: str, extra: list[str]):
    """The recipe's Config under the benchmark's settings (no checkpoints, a run that never ends) and `extra`."""
    from pretrain.config import load_config

    path = CONFIGS / RECIPES[recipe]
    if not path.exists():
        raise UserError(f"bench feed reads the recipe {path}, which is missing: run it from a checkout of the "
                        "project (the configs/ folder beside pretrain/)")
    return load_config(str(path), [*BENCH, f"run.out_dir={out_dir}", "eval.every_steps=0",
                                   "deepspeed.zero_stage=0", *extra])


def timed(trainer, steps: int, warmup: int, drain: int, sync) -> dict:
    """`warmup` steps, then up to `drain` more until the queues are drained, then `steps` steps timed as one
    window -> seconds, data wait, CPU seconds of the process tree, warm-up steps, drained.

    Drained: a step (after the first) waited for data 10% of its time longer than the least wait before it
    (that least wait: what every step waits with the queues full, e.g. decoding on the GPU)."""
    trainer.train_steps(1)  # compiles and warms up while the workers fill their queues
    done, drained, waits = 1, False, []
    while done < warmup or (done < warmup + drain and not drained):
        t0, w0 = time.perf_counter(), trainer.data_wait_s
        trainer.train_steps(1)
        wait, step_s = trainer.data_wait_s - w0, time.perf_counter() - t0
        drained = drained or (bool(waits) and wait > min(waits) + 0.1 * step_s)
        waits.append(wait)
        done += 1
    sync()
    cpu0, w0, t0 = tree_cpu_s(), trainer.data_wait_s, time.perf_counter()
    trainer.train_steps(steps)
    sync()
    seconds, cpu1 = time.perf_counter() - t0, tree_cpu_s()
    cpu_s = sum(t - cpu0.get(pid, 0.0) for pid, t in cpu1.items())
    return {"seconds": seconds, "data_wait_s": trainer.data_wait_s - w0, "cpu_s": cpu_s, "warmup_steps": done,
            "drained": drained}


def measure_synthetic(recipe: str, batch: int, extra: list[str], plan: dict, sync, out_dir: str) -> dict:
    """The recipe's Trainer on one fixed uint8 batch in memory (no decoding, no workers)."""
    from pretrain.models import resolve_arch

    cfg = recipe_config(recipe, f"{out_dir}/{recipe}-synthetic", [f"data.batch_size={batch}", *extra])
    images, labels = synthetic_batch(batch, resolve_arch(cfg.model)["img_size"], CLASSES)
    trainer = build_ours(cfg, images, labels, CLASSES)
    try:
        return {**timed(trainer, plan["steps"], plan["warmup"], 0, sync), "batch": batch}
    finally:
        trainer.close()


def measure_fed(recipe: str, batch: int, extra: list[str], plan: dict, sync, out_dir: str) -> dict:
    """The recipe's Trainer reading the shards `extra` names through its own train stream."""
    import threading

    from pretrain import dist as pdist
    from pretrain.engine.trainer import Trainer

    cfg = recipe_config(recipe, out_dir, [f"data.batch_size={batch}", *extra])
    trainer = Trainer(cfg, pdist.setup(), threading.Event())
    try:
        got = timed(trainer, plan["steps"], plan["warmup"], plan["drain"], sync)
        return {**got, "decode": trainer.decode, "workers": cfg.data.workers, "batch": batch}
    finally:
        trainer.close()


def rates(got: dict, steps: int) -> dict:
    """img/s, data wait per step and cores busy of one timed window."""
    s = got["seconds"]
    return {"img_s": steps * got["batch"] / s, "wait_per_step": got["data_wait_s"] / steps,
            "wait_fraction": got["data_wait_s"] / s, "cores": got["cpu_s"] / s}


def row_of(recipe: str, shards: str, fed: dict, synth: dict, info: dict, setup: dict) -> dict:
    """One fed window against its recipe's synthetic one; the goal is judged on a GPU only."""
    f, b = rates(fed, setup["steps"]), rates(synth, setup["steps"])
    ratio = f["img_s"] / b["img_s"]
    on_gpu = setup["device"] != "cpu"
    return {"name": f"feed {recipe} {shards} decode={fed['decode']} workers={fed['workers']}", "recipe": recipe,
            "shards": shards, "image": info["image"], "shard_bytes_per_image": info["shard_bytes_per_image"],
            "decode": fed["decode"], "workers": fed["workers"], "batch": fed["batch"], "ours": f["img_s"],
            "baseline": b["img_s"], "unit": "img/s (fed vs synthetic)", "ratio": ratio,
            "data_wait_s_per_step": f["wait_per_step"], "data_wait_fraction": f["wait_fraction"],
            "cores": f["cores"], "baseline_cores": b["cores"], "cpu_s": fed["cpu_s"], "seconds": fed["seconds"],
            "warmup_steps": fed["warmup_steps"], "drained": fed["drained"],
            "buffer_batches": 2 * fed["workers"] + 1, "baseline_data_wait_s_per_step": b["wait_per_step"],
            "goal": f">= {GOAL[recipe]:.2f}x synthetic (on a GPU)",
            "met": bool(ratio >= GOAL[recipe]) if on_gpu else None, **setup}


# ----------------------------------------------------------------------------- the command


def choices(value: str, allowed, flag: str) -> list[str]:
    got = comma_list(value)
    for v in got:
        if v not in allowed:
            raise UserError(f"{flag}: unknown value {v!r}; choose from {','.join(allowed)}")
    if not got:
        raise UserError(f"{flag}: give at least one of {','.join(allowed)}")
    return got


def plan_of(args: argparse.Namespace) -> dict:
    """Sizes and counts of this run: the flags, or the dry run's micro set."""
    for flag, value, least in (("--feed-steps", args.feed_steps, 1), ("--feed-warmup", args.feed_warmup, 1),
                               ("--feed-drain", args.feed_drain, 0), ("--feed-batch", args.feed_batch, 1),
                               ("--feed-images", args.feed_images, 1)):
        if value < least:
            raise UserError(f"{flag} {value}: must be >= {least}")
    workers = worker_counts(args.feed_workers)
    if args.feed_dry_run:
        d = DRY_RUN
        extra = [f"model.arch={d['arch']}", f"model.img_size={d['img_size']}", *d["more"]]
        return dict(batch=d["batch"], images=d["images"], size=d["size"], max_side=d["max_side"], steps=d["steps"],
                    warmup=d["warmup"], drain=d["drain"], workers=workers, extra=extra)
    steps = max(1, args.feed_steps // 3) if args.quick else args.feed_steps
    return dict(batch=args.feed_batch, images=args.feed_images, size=(500, 375), max_side=args.feed_max_side,
                steps=steps, warmup=args.feed_warmup, drain=args.feed_drain, workers=workers, extra=[])


def worker_counts(value: str) -> list[int]:
    """--feed-workers -> the data.workers of each row ('': the usable cores minus 2, at least 1)."""
    if not value.strip():
        return [max(1, usable_cores() - 2)]
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--feed-workers {value!r}: give worker counts, e.g. 14 or 14,4") from None
    if not counts or min(counts) < 1:
        raise UserError(f"--feed-workers {value!r}: each count must be >= 1")
    return counts


def skip_reason(recipe: str, decode: str, device, out_dir: str) -> str:
    """Why `decode` cannot run with this recipe here ('' when it can)."""
    if decode != "gpu":
        return ""
    if device.type != "cuda":
        return "data.decode=gpu needs CUDA"
    host_only = recipe_config(recipe, out_dir, []).data.host_only_augmentations()
    return f"{host_only[0][0]}={host_only[0][1]!r} has no device form" if host_only else ""


def run(args: argparse.Namespace):
    """Per recipe: the synthetic window, then each fed variant; each row yielded as soon as it is measured."""
    device = bench_device()
    recipes = choices(args.feed_recipes, RECIPES, "--feed-recipes")
    kinds = choices(args.feed_shards, SHARDS, "--feed-shards")
    decodes = choices(args.feed_decode, DECODES, "--feed-decode")
    plan, sync = plan_of(args), device_sync(device)
    shards = feed_shards(args.feed_dir if not args.feed_dry_run else f"{args.feed_dir}/dry", plan["images"],
                         plan["size"], plan["max_side"], usable_cores())
    setup = {"device": device_name(device), "cores_usable": usable_cores(), "steps": plan["steps"],
             "compile": args.feed_compile}
    extra = [*plan["extra"], f"model.num_classes={CLASSES}", *(["model.compile=true"] if args.feed_compile else [])]
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            synth, batch = halving(lambda b: measure_synthetic(recipe, b, extra, plan, sync, tmp), plan["batch"],
                                   f"feed: {recipe} synthetic")
            free_memory()
            for kind, decode, workers in variants(recipe, kinds, decodes, plan["workers"], device, tmp):
                more = [f"data.train_urls={shards[kind]['index']}", f"data.workers={workers}",
                        f"data.decode={decode}", *extra]
                fed = measure_fed(recipe, batch, more, plan, sync, f"{tmp}/{recipe}-{kind}-{decode}-{workers}")
                free_memory()
                yield row_of(recipe, kind, fed, synth, shards[kind], setup)


def variants(recipe: str, kinds: list[str], decodes: list[str], workers: list[int], device, tmp: str):
    """(shards, decode, workers) of each fed row of `recipe`, in the order given; one that cannot run here is
    said on stderr and left out."""
    for kind in kinds:
        for decode in decodes:
            why = skip_reason(recipe, decode, device, f"{tmp}/check")
            if why:
                print(f"bench feed: {recipe} {kind} decode={decode} skipped: {why}", file=sys.stderr, flush=True)
                continue
            yield from ((kind, decode, w) for w in workers)

