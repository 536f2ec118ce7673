"""Objectives: one Task module per `task.kind`, all trained by the same engine.

A Task is the `torch.nn.Module` that DeepSpeed wraps, and a `Task` (below) for what the engine asks of it
besides: the engine never branches on `task.kind`. Contract (the engine, export and eval rely on it):
- `task.encoder` is a timm `VisionTransformer` (with its head for classification tasks; `num_classes=0`
  for MAE), so the engine's module state dict holds the encoder under the `encoder.` prefix and
  export strips that prefix to get timm's own key names.
- `forward(images, targets, step) -> (loss, metrics)`: images are normalised floats (B, C, H, W) on the
  device; targets are class indices (B,) or soft targets (B, K) under Mixup/CutMix, or None when the
  Task's `needs_labels` is false; `step` is the global micro-batch index (optimizer step x
  optim.accum_steps + micro-step), unique per batch; it seeds anything random (MAE masks) together with
  the run seed and `self.rank` (the engine sets that attribute after construction); metrics is a dict of
  0-dim tensors (no host sync: the engine averages them over steps and ranks and reads them only at log steps).
- `param_groups(cfg) -> list[dict]`: parameter groups for the optimizer (weight decay off for biases,
  norms, position embeddings and tokens; layer-wise lr decay where the task asks for it). Each group
  may carry `lr_scale`, which the engine's schedule multiplies in.
- `predict(images) -> logits` for classification tasks (eval, metrics); absent for MAE.
- `flops_per_image() -> float`: forward FLOPs of one training image (the engine's MFU estimate).
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


class Task:
    """What the engine asks of a Task besides its forward, with the defaults of a classifier trained from
    scratch. Mixed into each Task module (it holds no state of its own)."""

    needs_labels = True
    """The Task learns from labels: the engine counts classes (model.num_classes or the training shards'
    index), applies Mixup/CutMix (task.*) and passes targets. When false: no classes, no Mixup, targets None."""

    augment = "train"
    """The training stream's augmentations: 'train' (timm's supervised recipe: data.auto_augment, colour jitter,
    random erasing) or 'mae' (random resized crop and flip only: MAE pretraining and its linear probe)."""

    needs_pretrained = False
    """The constructor takes a third argument, (timm-keyed weights, export meta) of `finetune.init_from`,
    which the engine loads (tasks import neither engine nor export)."""

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise a UserError when `cfg.model` cannot build this Task's model (models/archs.py's rules, those
        for `task.kind` included); called before anything is built, as `vit-pretrain config` calls them."""
        from pretrain.models.archs import check_model_config

        check_model_config(cfg.model, cfg.task.kind)

    @classmethod
    def check_precision(cls, cfg, weight_dtype) -> None:
        """Raise a UserError when this Task, configured by `cfg`, cannot train with its module's weights
        held in `weight_dtype` (a torch dtype); called before anything is built."""

    def pictures(self, images, mean, std) -> dict:
        """TensorBoard pictures of `images` (B, C, H, W), normalised by `mean`/`std`: {tag: (3, H', W')
        grid in [0, 1]}. The engine calls it in eval mode, without gradients, with every parameter gathered."""
        from pretrain.viz.tensorboard import attention_grid

        return {"attention/last_block": attention_grid(self.encoder, images, mean, std)}


def task_class(cfg) -> type:
    """The Task class that `cfg.task.kind` names."""
    module, cls = TASKS[cfg.task.kind].split(":")
    return getattr(importlib.import_module(module), cls)


def build_task(cfg, num_classes: int, pretrained: tuple[dict, dict] | None = None):
    """The Task module for `cfg.task.kind`, its encoder built from `cfg.model` with `num_classes` outputs.
    `pretrained`: (timm-keyed weights, export meta) for a Task whose `needs_pretrained` is true (the
    caller loads `finetune.init_from`; tasks read no files)."""
    cls = task_class(cfg)
    return cls(cfg, num_classes, pretrained) if cls.needs_pretrained else cls(cfg, num_classes)


def model_record(cfg, num_classes: int) -> dict:
    """A run's `model.json`: its task kind, timm's create_model arguments for its encoder, and its classes
    (what export reads back to rebuild the encoder: engine/consolidate.run_meta)."""
    from pretrain.models import model_kwargs

    return {"task": cfg.task.kind, "create_model": {"name": cfg.model.arch, **model_kwargs(cfg.model, num_classes)},
            "num_classes": num_classes}
