"""`bench step`: our full training step (DeepSpeed engine, schedule, metrics window, logging cadence,
data handoff and device normalisation) against a bare PyTorch loop of the same timm model, batch,
optimizer and precision, both fed the same synthetic uint8 batch from memory. Goal: ours <= 1.03x.
"""
from __future__ import annotations

import argparse

import torch

from pretrain.bench.timing import bench_device, device_sync, interleaved, median

GOAL = 1.03


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("step")
    g.add_argument("--step-arch", default="vit_tiny_patch16_224")
    g.add_argument("--step-img-size", type=int, default=112)
    g.add_argument("--step-batch", type=int, default=32)
    g.add_argument("--step-zero", type=int, default=0, help="ZeRO stage of ours (1 process)")
    g.add_argument("--step-steps", type=int, default=5, help="steps per timed round")
    g.add_argument("--step-rounds", type=int, default=6)


class MemoryStream:
    """The train-stream interface over one fixed in-memory batch (no decoding, no workers)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        self.images, self.labels = images, labels
        self.num_classes = num_classes
        self.batches_per_epoch = 10**9
        self.num_samples = self.batches_per_epoch * images.shape[0]

    def iter_epoch_weighted(self, epoch: int):
        while True:
            yield self.images, self.labels, None, None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def bad_counts(self) -> dict:
        return {}

    def source_counts(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def synthetic_batch(batch: int, img_size: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    if torch.cuda.is_available():
        images, labels = images.pin_memory(), labels.pin_memory()
    return images, labels


BENCH = ["optim.max_steps=1000000", "optim.warmup_steps=10", "checkpoint.every_steps=0", "checkpoint.resume=never",
         "logging.progress=false", "logging.tensorboard=false", "logging.images_every_steps=0",
         "logging.every_steps=10", "run.name=bench"]
"""What every benchmark's Config shares: no checkpoints, no progress bar or images, a run that never ends."""


def bench_config(arch: str, img_size: int, batch: int, zero: int, kind: str, out_dir: str, extra=()):
    """A benchmark's Config: the given values as the base (written as YAML to out_dir/bench.yaml: data, not
    `key=value` text parsed again), BENCH and `extra` (overrides) on top; validated as a whole."""
    import os

    import yaml

    from pretrain.config import load_config

    values = {"model": {"arch": arch, "img_size": img_size}, "data": {"batch_size": batch},
              "deepspeed": {"zero_stage": zero}, "task": {"kind": kind}, "run": {"out_dir": out_dir}}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    return load_config(path, [*BENCH, *extra])


def build_ours(cfg, images, labels, num_classes):
    """A real Trainer (one process) whose stream is the in-memory batch."""
    import threading

    from pretrain import dist as pdist
    from pretrain.engine.trainer import Trainer

    env = pdist.setup()
    trainer = Trainer(cfg, env, threading.Event(), stream=MemoryStream(images, labels, num_classes))
    return trainer


def build_baseline(cfg, images, labels, num_classes, device, ddp: bool = False, compile: bool = False):
    """The bare loop: the same timm model, our optimizer (AdamW, fused on CUDA, our tasks' weight-decay
    groups; without the engine's non-finite guard), our input path (the uint8 batch copied to the device and
    normalised every step), the same loss and precision; no engine, no logging. `compile`: the whole model
    under torch.compile, as timm's train.py --torchcompile does; `ddp`: wrapped in DistributedDataParallel."""
    from pretrain.data import normalize
    from pretrain.engine.ds import build_optimizer, resolve_precision
    from pretrain.tasks.supervised import SupervisedTask

    torch.manual_seed(cfg.run.seed)
    task = SupervisedTask(cfg, num_classes).to(device)
    opt = build_optimizer(cfg, task.param_groups(cfg), device, guard=False)
    for g in opt.param_groups:
        g["lr"] = 1e-4  # ours starts at lr 0 in warm-up; a non-zero lr keeps the update from being trivial
    model = task.encoder
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        model = torch.compile(model)
    precision = resolve_precision(cfg.deepspeed, device)
    mean, std = cfg.data.mean, cfg.data.std
    model.train()

    def step():
        x = normalize(images.to(device, non_blocking=True), mean, std)
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=precision.autocast, enabled=precision.autocast is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y, label_smoothing=cfg.task.label_smoothing)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(args: argparse.Namespace) -> dict:
    import tempfile

    bench_device()
    num_classes = 10
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(args.step_arch, args.step_img_size, args.step_batch, args.step_zero, "supervised", tmp)
        images, labels = synthetic_batch(args.step_batch, args.step_img_size, num_classes)
        trainer = build_ours(cfg, images, labels, num_classes)
        base_step = build_baseline(cfg, images, labels, num_classes, trainer.device)
        n = args.step_steps
        sync = device_sync(trainer.device)
        times = interleaved({"ours": lambda: trainer.train_steps(n), "baseline": lambda: [base_step() for _ in range(n)]},
                            rounds=2 if args.quick else args.step_rounds, sync=sync)
        trainer.log.close()
    ours, base = median(times["ours"]) / n, median(times["baseline"]) / n
    ratio = ours / base
    return {"name": "step", "ours": ours, "baseline": base, "unit": "s/step", "ratio": ratio,
            "goal": f"<= {GOAL}", "met": ratio <= GOAL,
            "setup": f"{args.step_arch} img {args.step_img_size} batch {args.step_batch} ZeRO-{args.step_zero} "
                     f"{trainer.precision.name} {trainer.device}", "rounds": times}
