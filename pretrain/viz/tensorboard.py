"""TensorBoard pictures: MAE input / masked / reconstruction grids, and attention maps (viz/attention.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import pretrain._compat  # noqa: F401  before torchvision: makes it importable on a CPU-only torch
from torchvision.utils import make_grid

from pretrain.viz.attention import last_block_maps


def _denorm(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() * s + m).clamp(0, 1)


@torch.no_grad()
def mae_grid(task, images: torch.Tensor, noise: torch.Tensor, mean, std) -> torch.Tensor:
    """Rows of (input, masked input, reconstruction) for each image -> (3, H', W') in [0, 1]."""
    masked, recon = task.reconstruct(images, noise)
    rows = torch.stack([_denorm(images, mean, std), _denorm(masked, mean, std), _denorm(recon, mean, std)], 1)
    return make_grid(rows.flatten(0, 1).cpu(), nrow=3, padding=1)


def attention_grid(encoder, images: torch.Tensor, mean, std) -> torch.Tensor:
    """Rows of (image, image overlaid with its attention map) -> (3, H', W')."""
    maps = last_block_maps(encoder, images)  # (B, gh, gw)
    imgs = _denorm(images, mean, std)
    heat = F.interpolate(maps.unsqueeze(1).float(), size=imgs.shape[-2:], mode="nearest")  # (B, 1, H, W)
    overlay = 0.4 * imgs + 0.6 * heat * torch.tensor([1.0, 0.3, 0.0], device=imgs.device).view(1, 3, 1, 1)
    rows = torch.stack([imgs, overlay.clamp(0, 1)], 1)
    return make_grid(rows.flatten(0, 1).cpu(), nrow=2, padding=1)
