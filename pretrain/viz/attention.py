"""Where a ViT looks: the one implementation of attention maps, used by TensorBoard's pictures,
`vit-pretrain visualize` and the quickstart's report.

Attention probabilities come from timm's own Attention modules (VisionTransformer's or Eva's, RoPE applied)
run unfused (`fused_attn=False`): the fused SDPA kernel never materialises them, the unfused path hands
them to `attn_drop`, where a hook reads them. A map is the attention of the query the model's head reads:
the class token's row, or, for a model that pools the mean of its patch tokens (`global_pool='avg'`, or no
class token: registers only), the mean of the patch queries' rows; over patches only.
"""
from __future__ import annotations

import contextlib

import torch


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


def pooled_query(encoder) -> str:
    """Which query the head reads: 'class token', or 'mean patch query' for average pooling."""
    if getattr(encoder, "cls_token", None) is not None and getattr(encoder, "global_pool", "token") == "token":
        return "class token"
    return "mean patch query"


def pooled_rows(encoder, probs: torch.Tensor) -> torch.Tensor:
    """(..., N, N) attention probabilities -> (..., L): the pooled query's row over the L patches."""
    prefix = encoder.num_prefix_tokens
    row = probs[..., 0, :] if pooled_query(encoder) == "class token" else probs[..., prefix:, :].mean(-2)
    return row[..., prefix:]


@torch.no_grad()
def attention(encoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attention to every patch of image x (1, C, H, W): per head in the last block (h, gh, gw),
    their mean (gh, gw), and the rollout over all blocks (Abnar & Zuidema, 2020) (gh, gw); and the
    logits when the model has a head."""
    with unfused_attention(encoder) as probs:
        logits = encoder(x)
    gh, gw = encoder.patch_embed.grid_size
    last = probs[-1][0]  # (h, N, N)
    heads = pooled_rows(encoder, last).reshape(-1, gh, gw)
    # rollout: average the heads, add the residual path (identity), renormalise rows, multiply through depth
    n = last.shape[-1]
    eye = torch.eye(n)
    rollout = eye
    for a in probs:
        a = a[0].mean(0) + eye  # (N, N)
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    return {"heads": heads, "mean": heads.mean(0), "rollout": pooled_rows(encoder, rollout).reshape(gh, gw),
            "logits": logits[0] if logits.ndim == 2 and logits.shape[-1] > 0 and encoder.num_classes else None}


@torch.no_grad()
def last_block_maps(encoder, images: torch.Tensor) -> torch.Tensor:
    """The last block's attention of the pooled query to every patch, averaged over heads, for a batch
    (B, C, H, W) -> (B, gh, gw), each map scaled to [0, 1]."""
    with unfused_attention(encoder) as probs:
        encoder.forward_features(images)
    maps = pooled_rows(encoder, probs[-1]).mean(1)  # (B, h, N, N) -> (B, h, L) -> (B, L)
    b = maps.shape[0]
    maps = maps.reshape(b, *encoder.patch_embed.grid_size)
    lo = maps.flatten(1).min(1).values.view(b, 1, 1)
    hi = maps.flatten(1).max(1).values.view(b, 1, 1)
    return (maps - lo) / (hi - lo + 1e-12)
