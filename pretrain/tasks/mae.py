"""MAE pretraining task: the masked autoencoder as a Task (see pretrain/tasks/__init__.py)."""
from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay

from pretrain.models import create_model, model_kwargs
from pretrain.models.mae import MaskedAutoencoder, mae_flops_per_image
from pretrain.tasks import Task


def mask_noise(seed: int, step: int, rank: int, batch: int, num_patches: int, device) -> torch.Tensor:
    """(B, L) uniform noise that decides the masks: a pure function of (seed, step, rank).

    Drawn on the CPU (the same numbers on every device type), then moved; a resumed run therefore
    draws the same masks as an uninterrupted one.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + rank)
    noise = torch.rand(batch, num_patches, generator=g)
    if torch.device(device).type == "cuda":
        noise = noise.pin_memory()  # an asynchronous copy: no wait on the device queue
    return noise.to(device, non_blocking=True)


class MaeTask(Task, MaskedAutoencoder):
    """`encoder.*` is the timm ViT (num_classes=0); `decoder_*` and `mask_token` are the decoder."""

    needs_labels = False
    augment = "mae"

    def __init__(self, cfg, num_classes: int = 0):
        m = cfg.mae
        encoder = create_model(cfg.model.arch, **model_kwargs(cfg.model, 0))
        super().__init__(encoder, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
                         decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                         decoder_num_heads=m.decoder_num_heads)
        self.seed = cfg.run.seed
        self.rank = 0  # set by the engine

    def forward(self, images: torch.Tensor, targets=None, step: int = 0, weight=None):
        """`weight` (B,) of 0/1 marks padding in a ragged step: the loss averages the samples of weight 1."""
        noise = mask_noise(self.seed, step, self.rank, images.shape[0], self.num_patches, images.device)
        loss, _, mask = self.forward_loss(images, noise, weight)
        return loss, {"loss": loss.detach(), "mask_ratio": mask.detach().mean()}

    def external_params(self) -> list:
        """Encoder parameters read directly in forward_encoder (ZeRO-3 gathers them with our forward)."""
        enc = self.encoder
        return [p for p in (enc.cls_token, enc.reg_token, enc.pos_embed) if isinstance(p, torch.nn.Parameter)]

    def param_groups(self, cfg) -> list[dict]:
        skip = {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token"}
        return param_groups_weight_decay(self, cfg.optim.weight_decay, no_weight_decay_list=skip)

    def flops_per_image(self) -> float:
        return mae_flops_per_image(self)

    def pictures(self, images, mean, std) -> dict:
        """Input, masked input and reconstruction (the masks of micro-batch 0: the same every time), then
        the encoder's attention."""
        from pretrain.viz.tensorboard import mae_grid

        noise = mask_noise(self.seed, 0, self.rank, images.shape[0], self.num_patches, images.device)
        return {"mae/input_masked_reconstruction": mae_grid(self, images, noise, mean, std),
                **super().pictures(images, mean, std)}
