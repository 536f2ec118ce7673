"""Supervised classification: cross-entropy with label smoothing, or soft targets under Mixup/CutMix."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay

from pretrain.errors import UserError
from pretrain.models import create_model, flops_per_image, model_kwargs
from pretrain.tasks import Task


def weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (B,) over the samples of weight 1; 0 (still part of the graph) when there are none."""
    return (values * weight).sum() / weight.sum().clamp(min=1)


def check_classes(cfg, num_classes: int) -> None:
    """A classifier needs classes: model.num_classes, or the class names of the training shards' index."""
    if num_classes <= 0:
        urls = cfg.data.train_urls or [src.train_urls for src in cfg.data.sources]
        raise UserError(f"task.kind={cfg.task.kind} needs classes but the training shard index names none "
                        f"({urls!r}); set model.num_classes or write shards with labels")


class SupervisedTask(Task, torch.nn.Module):
    """`encoder` is a timm ViT with its classifier head."""

    def __init__(self, cfg, num_classes: int):
        check_classes(cfg, num_classes)
        super().__init__()
        self.encoder = create_model(cfg.model.arch, **model_kwargs(cfg.model, num_classes))
        self.label_smoothing = cfg.task.label_smoothing
        self.rank = 0

    def forward(self, images: torch.Tensor, targets: torch.Tensor, step: int = 0, weight=None):
        """-> (loss, metrics). `weight` (B,) of 0/1 marks padding in a ragged step (pretrain/data/plan.py):
        the loss and accuracy are then means over the samples of weight 1."""
        logits = self.encoder(images).float()  # (B, K)
        if targets.ndim == 2:  # soft targets from Mixup/CutMix (smoothing already folded in)
            per_sample = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1)
            loss = per_sample.mean() if weight is None else weighted_mean(per_sample, weight)
            return loss, {"loss": loss.detach()}
        if weight is None:
            loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
            acc1 = logits.detach().argmax(dim=1).eq(targets).float().mean()  # 0-dim, on the device
        else:
            per_sample = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing, reduction="none")
            loss = weighted_mean(per_sample, weight)
            hit = logits.detach().argmax(dim=1).eq(targets).float()
            acc1 = weighted_mean(hit, weight)
        return loss, {"loss": loss.detach(), "acc1": acc1}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def param_groups(self, cfg) -> list[dict]:
        skip = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return param_groups_weight_decay(self, cfg.optim.weight_decay, no_weight_decay_list=skip)

    def flops_per_image(self) -> float:
        enc = self.encoder
        drop = getattr(getattr(enc, "patch_drop", None), "prob", 0.0)
        if drop and self.training:  # patch dropout: the blocks see the kept patches only (timm keeps >= 1)
            kept = max(1, int(enc.patch_embed.num_patches * (1 - drop)))
            return flops_per_image(enc, tokens=enc.num_prefix_tokens + kept)
        return flops_per_image(enc)
