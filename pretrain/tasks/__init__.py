"""Objectives: one Task module per `task.kind`, all trained by the same engine.

A Task is the `torch.nn.Module` that DeepSpeed wraps. Contract (the engine, export and eval rely on it):
- `task.encoder` is a timm `VisionTransformer` (with its head for classification tasks; `num_classes=0`
  for MAE), so the engine's module state dict holds the encoder under the `encoder.` prefix and
  export strips that prefix to get timm's own key names.
- `forward(images, targets, step) -> (loss, metrics)`: images are normalised floats (B, C, H, W) on the
  device; targets are class indices (B,) or soft targets (B, K) under Mixup/CutMix, or None for MAE;
  `step` is the global micro-batch index (optimizer step x optim.accum_steps + micro-step), unique per
  batch; it seeds anything random (MAE masks) together with the run seed and `self.rank` (the engine
  sets that attribute after construction); metrics is a dict of 0-dim tensors (no host sync: the
  engine averages them over steps and ranks and reads them only at log steps).
- `param_groups(cfg) -> list[dict]`: parameter groups for the optimizer (weight decay off for biases,
  norms, position embeddings and tokens; layer-wise lr decay where the task asks for it). Each group
  may carry `lr_scale`, which the engine's schedule multiplies in.
- `predict(images) -> logits` for classification tasks (eval, metrics); absent for MAE.
- `flops_per_image() -> float`: forward FLOPs of one training image (the engine's MFU estimate).
- `needs_pretrained`: when true, the constructor takes a third argument, (timm-keyed weights, export
  meta) of `finetune.init_from`, which the engine loads (tasks import neither engine nor export).
- optional `external_params() -> list[Parameter]`: parameters read outside their own module's forward
  (MAE reads the encoder's tokens and position embeddings directly); ZeRO-3 gathers them with the
  Task's forward.
"""
from __future__ import annotations

import importlib

import pretrain._compat  # noqa: F401  before any module here imports timm (importable on a CPU-only torch)

TASKS = {
    "supervised": "pretrain.tasks.supervised:SupervisedTask",
    "mae": "pretrain.tasks.mae:MaeTask",
    "finetune": "pretrain.tasks.finetune:FinetuneTask",
    "linprobe": "pretrain.tasks.linprobe:LinprobeTask",
}


def task_class(kind: str) -> type:
    """The Task class of a `task.kind`."""
    module, cls = TASKS[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def build_task(cfg, num_classes: int, pretrained: tuple[dict, dict] | None = None):
    """The Task module for `cfg.task.kind`, its encoder built from `cfg.model` with `num_classes` outputs.
    `pretrained`: (timm-keyed weights, export meta) for a Task whose `needs_pretrained` is true (the
    caller loads `finetune.init_from`; tasks read no files)."""
    cls = task_class(cfg.task.kind)
    return cls(cfg, num_classes, pretrained) if cls.needs_pretrained else cls(cfg, num_classes)
