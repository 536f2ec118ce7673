"""The one evaluation loop, `evaluate()` (the trainer's periodic and final eval, `vit-pretrain eval`, the
quickstart): counts are summed across ranks once, after the loop, because ranks may hold different
numbers of batches.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pretrain._compat  # noqa: F401  before timm: makes it importable on a CPU-only torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

if TYPE_CHECKING:
    from pretrain.config import DataConfig
    from pretrain.data import EvalStream


@torch.no_grad()
def evaluate(task_or_model: torch.nn.Module, stream, device, *, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
             dtype: torch.dtype = torch.float32, autocast=contextlib.nullcontext) -> dict:
    """{"top1", "top5" (fractions in [0, 1], as the trainer logs them), "loss" (mean cross-entropy), "n"}
    over every labelled sample of `stream`
    (batches of uint8 (B, C, H, W) images and int64 (B,) labels) on all ranks together; unlabelled samples
    (label -1) are left out. `dtype`: the model's input dtype; `autocast`: a context factory for the forward
    (the trainer's precision)."""
    from pretrain.data import normalize

    predict = getattr(task_or_model, "predict", task_or_model)
    was_training = task_or_model.training
    task_or_model.eval()
    # (correct@1, correct@5, summed loss, count) as one float64 vector: one all_reduce at the end
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels in stream:
        keep = labels >= 0  # unlabelled samples cannot be scored
        if not bool(keep.any()):
            continue
        images, labels = images[keep].to(device, non_blocking=True), labels[keep].to(device, non_blocking=True)
        with autocast():
            logits = predict(normalize(images, mean, std).to(dtype)).float()  # (B, K)
        k5 = min(5, logits.shape[1])
        top = logits.topk(k5, dim=1).indices  # (B, k5)
        hit = top.eq(labels[:, None])
        totals += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), F.cross_entropy(logits, labels, reduction="sum"),
                               torch.tensor(labels.numel(), device=device)]).double()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    task_or_model.train(was_training)
    c1, c5, loss, n = totals.tolist()
    n = int(n)
    return {"top1": c1 / max(n, 1), "top5": c5 / max(n, 1), "loss": loss / max(n, 1), "n": n}


def eval_data(meta: dict, batch_size: int = 1, workers: int = 0) -> DataConfig:
    """The data settings an exported model is evaluated with: its normalisation and eval crop as the run
    that made it used them (the defaults where the export does not record them)."""
    from pretrain.config import load_config

    values: dict = {"batch_size": batch_size, "workers": workers}
    if meta.get("mean") and meta.get("std"):
        values.update(mean=list(meta["mean"]), std=list(meta["std"]))
    if meta.get("eval_crop_pct"):
        values["eval_crop_pct"] = float(meta["eval_crop_pct"])
    return dataclasses.replace(load_config(None).data, **values)


def eval_stream(urls, meta: dict, batch_size: int, workers: int, rank: int = 0, world_size: int = 1) -> EvalStream:
    """The eval stream of `urls` for an exported model (`meta`: its .json): the model's input size and
    `eval_data(meta)`; normalise its batches with `stream.data.mean` / `.std`."""
    from pretrain.data import build_eval_stream

    return build_eval_stream(urls, eval_data(meta, batch_size, workers), rank, world_size,
                             img_size=meta["timm_kwargs"]["img_size"])
