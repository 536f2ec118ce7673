"""Masked autoencoder (He et al., 2021) around our timm ViT encoder.

The encoder is an unmodified timm `VisionTransformer` (num_classes=0) that sees only the visible
patches; a light decoder (timm `Block`s, fixed 2-D sin-cos position embeddings) reconstructs every
patch; the loss is taken on the masked patches only. Masks come from a caller-supplied noise tensor,
so the caller decides how they are seeded (the MAE task seeds them with (seed, step, rank)).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import pretrain._compat  # noqa: F401  before timm: makes it importable on a CPU-only torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in raster order, pixels (p, p, C) inside each."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); the inverse of patchify for a square grid."""
    b, n, _ = x.shape
    h = w = int(n ** 0.5)
    x = x.reshape(b, h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, h * p, w * p)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    """Keep the (1 - mask_ratio) patches with the smallest noise, per sample.

    x: (B, L, D), noise: (B, L) -> x_visible (B, L_keep, D), mask (B, L) fp32 1 = hidden, ids_restore (B, L).
    The mask is fp32 whatever x's dtype: its sum (the loss's denominator) overflows fp16 above 65504
    hidden patches (micro-batch 446 at ViT-B/16) and rounds in bf16.
    """
    b, n, d = x.shape
    keep = int(n * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device, dtype=torch.float32)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_visible, mask, ids_restore


class MaskedAutoencoder(nn.Module):
    """encoder (timm ViT, visible patches only) + decoder; `forward_loss(imgs, noise)`."""

    def __init__(self, encoder: VisionTransformer, *, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.in_chans = encoder.patch_embed.proj.in_channels
        grid = encoder.patch_embed.grid_size
        self.num_patches = grid[0] * grid[1]

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        # fixed sin-cos position embeddings (class token: zeros); a buffer, so never trained or decayed
        pos = build_sincos2d_pos_embed(list(grid), dim=decoder_embed_dim)  # (L, Dd)
        self.register_buffer("decoder_pos_embed", torch.cat([torch.zeros(1, decoder_embed_dim), pos])[None],
                             persistent=False)  # (1, 1+L, Dd)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * self.in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        # as the MAE reference: normal(0.02) mask token, xavier-uniform linears, unit layer norms
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("encoder"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ encoder on visible patches
    def forward_encoder(self, imgs: torch.Tensor, noise: torch.Tensor):
        """imgs (B, C, H, W), noise (B, L) -> latent (B, prefix + L_keep, D), mask (B, L), ids_restore.

        The class and register tokens are never masked. With rotary embeddings (timm's Eva) each visible
        patch keeps its own position's rotation: the rotation table is gathered with the kept indices, the
        way Eva's own patch dropout does it (`apply_keep_indices_nlc`).
        """
        enc = self.encoder
        x = enc.patch_embed(imgs)  # (B, L, D), or (B, h, w, D) when the encoder takes dynamic sizes
        grid = x.shape[1:3] if x.ndim == 4 else None
        x = x.flatten(1, 2) if x.ndim == 4 else x
        prefix = enc.num_prefix_tokens
        prefix_pos = None
        if enc.pos_embed is not None:
            if enc.no_embed_class:
                x = x + enc.pos_embed
            else:
                x = x + enc.pos_embed[:, prefix:]
                prefix_pos = enc.pos_embed[:, :prefix]
        x, mask, ids_restore = random_masking(x, self.mask_ratio, noise)
        rope = self._visible_rope(grid, noise, x)
        tokens = []
        if enc.cls_token is not None:
            tokens.append(enc.cls_token.expand(x.shape[0], -1, -1))
        if enc.reg_token is not None:
            tokens.append(enc.reg_token.expand(x.shape[0], -1, -1))
        if tokens:
            t = torch.cat(tokens, dim=1)
            if prefix_pos is not None:
                t = t + prefix_pos
            x = torch.cat([t, x], dim=1)
        x = enc.norm_pre(enc.pos_drop(x))
        kw = {} if rope is None else {"rope": rope}
        for blk in enc.blocks:
            if enc.grad_checkpointing and self.training:
                x = checkpoint(blk, x, use_reentrant=False, **kw)
            else:
                x = blk(x, **kw)
        return enc.norm(x), mask, ids_restore

    def _visible_rope(self, grid, noise: torch.Tensor, x_visible: torch.Tensor):
        """The rotary table rows of the visible patches, (B, 1, L_keep, dim), or None without RoPE."""
        enc = self.encoder
        if getattr(enc, "rope", None) is None:
            return None
        from timm.layers import apply_keep_indices_nlc

        table = enc.rope.get_embed(shape=list(grid)) if grid is not None else enc.rope.get_embed()  # (L, dim)
        ids_keep = torch.argsort(noise, dim=1)[:, :x_visible.shape[1]]  # (B, L_keep), as random_masking keeps
        return apply_keep_indices_nlc(x_visible, table, ids_keep).unsqueeze(1)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, prefix + L_keep, D) -> predicted pixels (B, L, p*p*C)."""
        prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, prefix + L_keep, Dd)
        b, n_vis = x.shape[0], x.shape[1] - prefix
        n = ids_restore.shape[1]
        masked = self.mask_token.to(x.dtype).expand(b, n - n_vis, -1)
        patches = torch.cat([x[:, prefix:], masked], dim=1)  # (B, L, Dd), shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        first = x[:, :1] if prefix else torch.zeros_like(x[:, :1])  # one leading token, as the reference
        x = torch.cat([first, patches], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, weight=None) -> torch.Tensor:
        """Mean squared error on the hidden patches (targets per-patch normalised if norm_pix_loss), in fp32
        whatever the dtypes of imgs, pred and mask; `weight` (B,) of 0/1 leaves the samples of weight 0 out."""
        target = patchify(imgs.float(), self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
        mask = mask.float()
        if weight is not None:
            mask = mask * weight[:, None]
            return (per_patch * mask).sum() / mask.sum().clamp(min=1)
        return (per_patch * mask).sum() / mask.sum()

    def forward_loss(self, imgs: torch.Tensor, noise: torch.Tensor, weight=None):
        """-> loss (0-dim), pred (B, L, p*p*C), mask (B, L)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(imgs, pred, mask, weight), pred, mask

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, noise: torch.Tensor):
        """For image grids: (masked input, reconstruction with visible patches pasted back), both (B, C, H, W)."""
        _, pred, mask = self.forward_loss(imgs, noise)
        p, c = self.patch_size, self.in_chans
        target = patchify(imgs.float(), p)
        if self.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred.float() * std + mean
        m = mask.unsqueeze(-1)
        masked = unpatchify(target * (1 - m), p, c)
        recon = unpatchify(target * (1 - m) + pred.float() * m, p, c)
        return masked, recon


def mae_flops_per_image(model: MaskedAutoencoder) -> float:
    """Forward FLOPs of one image: encoder on the visible tokens plus decoder on all tokens."""
    from pretrain.models.vit import block_flops, flops_per_image

    enc = model.encoder
    visible = int(model.num_patches * (1 - model.mask_ratio)) + enc.num_prefix_tokens
    enc_flops = flops_per_image(enc, tokens=visible)
    # the patch embedding runs on every patch before masking
    enc_flops += 2 * (model.num_patches - visible + enc.num_prefix_tokens) * enc.patch_embed.proj.weight.numel()
    dd = model.decoder_embed.out_features
    n = model.num_patches + 1
    hidden = model.decoder_blocks[0].mlp.fc1.out_features if len(model.decoder_blocks) else 0
    dec = len(model.decoder_blocks) * block_flops(n, dd, hidden)
    dec += 2 * visible * enc.embed_dim * dd + 2 * n * dd * model.decoder_pred.out_features
    return float(enc_flops + dec)


__all__ = ["MaskedAutoencoder", "patchify", "unpatchify", "random_masking", "mae_flops_per_image"]
