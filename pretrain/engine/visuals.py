"""TensorBoard pictures: MAE input / masked / reconstruction grids and class-token attention maps."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid


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


@contextlib.contextmanager
def unfused_attention(encoder):
    """Run every block's timm attention (VisionTransformer's or Eva's, RoPE applied) unfused and collect its
    softmax probabilities (B, h, N, N)."""
    attns = [blk.attn for blk in encoder.blocks]
    probs: list[torch.Tensor] = []
    saved = [a.fused_attn for a in attns]
    hooks = [a.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o.detach())) for a in attns]
    for a in attns:
        a.fused_attn = False
    try:
        yield probs
    finally:
        for a, fused in zip(attns, saved):
            a.fused_attn = fused
        for h in hooks:
            h.remove()


@torch.no_grad()
def attention_maps(encoder, images: torch.Tensor) -> torch.Tensor:
    """Attention of the class token (or, without one, the mean over patch queries) to every patch in
    the last block, averaged over heads -> (B, gh, gw) in [0, 1]."""
    with unfused_attention(encoder) as probs:
        encoder.forward_features(images)
    weights = probs[-1]  # (B, h, N, N), the last block's
    b = weights.shape[0]
    prefix = encoder.num_prefix_tokens
    query = weights[:, :, 0] if prefix else weights.mean(2)  # (B, h, N)
    maps = query[..., prefix:].mean(1)  # (B, L)
    gh, gw = encoder.patch_embed.grid_size
    maps = maps.reshape(b, gh, gw)
    lo = maps.flatten(1).min(1).values.view(b, 1, 1)
    hi = maps.flatten(1).max(1).values.view(b, 1, 1)
    return (maps - lo) / (hi - lo + 1e-12)


def attention_grid(encoder, images: torch.Tensor, mean, std) -> torch.Tensor:
    """Rows of (image, image overlaid with its attention map) -> (3, H', W')."""
    maps = attention_maps(encoder, images)  # (B, gh, gw)
    imgs = _denorm(images, mean, std)
    heat = F.interpolate(maps.unsqueeze(1).float(), size=imgs.shape[-2:], mode="nearest")  # (B, 1, H, W)
    overlay = 0.4 * imgs + 0.6 * heat * torch.tensor([1.0, 0.3, 0.0], device=imgs.device).view(1, 3, 1, 1)
    rows = torch.stack([imgs, overlay.clamp(0, 1)], 1)
    return make_grid(rows.flatten(0, 1).cpu(), nrow=2, padding=1)
