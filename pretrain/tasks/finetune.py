"""Fine-tuning: a pretrained encoder (the engine loads `finetune.init_from` and hands its weights in) with a fresh head, the MAE/BEiT
recipe: layer-wise lr decay (timm's helper), drop path, label smoothing, optional weight EMA.
Mixup/CutMix and RandAugment come from the engine and the data stream (task.* and data.auto_augment)."""
from __future__ import annotations

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.utils import ModelEmaV3

from pretrain.errors import UserError
from pretrain.models import load_weights
from pretrain.tasks.supervised import SupervisedTask


class FinetuneTask(SupervisedTask):
    """`encoder` is the pretrained timm ViT with a new head of `num_classes` outputs."""

    needs_pretrained = True

    def __init__(self, cfg, num_classes: int, pretrained: tuple[dict, dict]):
        super().__init__(cfg, num_classes)
        state, self.source_meta = pretrained
        load_weights(self.encoder, state, new_head=True)  # positions resampled to this grid
        with torch.no_grad():  # MAE's fine-tune head init: tiny weights, zero bias
            torch.nn.init.trunc_normal_(self.encoder.head.weight, std=2e-5)
            torch.nn.init.zeros_(self.encoder.head.bias)
        self.ema = None
        if cfg.finetune.ema_decay > 0:
            if cfg.deepspeed.zero_stage == 3:
                raise UserError("config key finetune.ema_decay: weight EMA needs whole parameters on every "
                                "rank; use deepspeed.zero_stage <= 2 or finetune.ema_decay=0")
            # a frozen copy registered as a submodule: saved in checkpoints as `ema.module.*`
            self.ema = ModelEmaV3(self.encoder, decay=cfg.finetune.ema_decay)
            self.ema.requires_grad_(False)
        self.accum = cfg.optim.accum_steps
        self._ema_step = -1

    @classmethod
    def check_precision(cls, cfg, weight_dtype) -> None:
        if cfg.finetune.ema_decay > 0 and weight_dtype != torch.float32:
            raise UserError(f"config key finetune.ema_decay: a weight EMA needs fp32 weights, but deepspeed.precision="
                            f"{cfg.deepspeed.precision} (bf16_mode={cfg.deepspeed.bf16_mode}) keeps the module in "
                            f"{weight_dtype}, where updates of (1 - decay) x the change round away; "
                            "use deepspeed.bf16_mode=autocast or finetune.ema_decay=0")

    def forward(self, images: torch.Tensor, targets: torch.Tensor, step: int = 0, weight=None):
        # `step` counts micro-batches; the weights now are those after optimizer step `step // accum`:
        # fold them into the EMA once per optimizer step (Mixup/CutMix is applied by the engine)
        opt_step = step // self.accum
        if self.ema is not None and self.training and opt_step != self._ema_step:
            self.ema.update(self.encoder, step=opt_step)
            self._ema_step = opt_step
        return super().forward(images, targets, step, weight)

    def param_groups(self, cfg) -> list[dict]:
        skip = set(self.encoder.no_weight_decay())
        if cfg.finetune.layer_decay < 1.0:
            # groups carry `lr_scale` = layer_decay ** (depth + 1 - layer), which the engine's schedule applies
            return param_groups_layer_decay(self.encoder, weight_decay=cfg.optim.weight_decay,
                                            no_weight_decay_list=skip, layer_decay=cfg.finetune.layer_decay)
        return param_groups_weight_decay(self.encoder, cfg.optim.weight_decay, no_weight_decay_list=skip)
