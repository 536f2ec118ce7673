"""Linear probing (MAE recipe): frozen encoder, BatchNorm without affine, then a linear head."""
from __future__ import annotations

import torch

from pretrain.models import create_model, load_weights, model_kwargs
from pretrain.tasks.supervised import SupervisedTask, check_classes


class LinprobeTask(SupervisedTask):
    """`encoder` is the frozen pretrained ViT whose `head` (trained) reads BatchNorm-ed features.

    The BatchNorm sits in a pre-forward hook of `encoder.head`, so the whole forward goes through
    `encoder(...)` (ZeRO-3 gathers parameters per module call). It has no affine part, so export folds
    it into the head and the exported file is a plain timm ViT.
    """

    needs_pretrained = True
    augment = "mae"

    def __init__(self, cfg, num_classes: int, pretrained: tuple[dict, dict]):
        check_classes(cfg, num_classes)
        torch.nn.Module.__init__(self)  # the supervised objective, predict and FLOPs; our own encoder
        kwargs = dict(model_kwargs(cfg.model, num_classes), drop_path_rate=0.0, patch_drop_rate=0.0)
        self.encoder = create_model(cfg.model.arch, **kwargs)
        state, self.source_meta = pretrained
        load_weights(self.encoder, state, new_head=True)
        self.encoder.requires_grad_(False)
        self.encoder.head.requires_grad_(True)
        with torch.no_grad():
            torch.nn.init.trunc_normal_(self.encoder.head.weight, std=0.01)
            torch.nn.init.zeros_(self.encoder.head.bias)
        self.head_bn = torch.nn.BatchNorm1d(self.encoder.num_features, affine=False, eps=1e-6)
        self.encoder.head.register_forward_pre_hook(self._normalize_features)
        self.label_smoothing = cfg.task.label_smoothing
        self.rank = 0

    def _normalize_features(self, module, args):
        return (self.head_bn(args[0]),)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no drop path / dropout in the encoder, ever
        return self

    def param_groups(self, cfg) -> list[dict]:
        return [{"params": list(self.encoder.head.parameters()), "weight_decay": cfg.optim.weight_decay,
                 "lr_scale": 1.0}]
