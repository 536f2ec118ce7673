"""The ViT family: timm's VisionTransformer under registered names, with our few options on top.

Names mirror timm's, so a checkpoint exported from `vit_base_patch16_224` loads into
`timm.create_model("vit_base_patch16_224")` unchanged. Attention uses timm's fused path
(torch.nn.functional.scaled_dot_product_attention).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from pretrain.errors import UserError

# name -> (embed_dim, depth, num_heads, patch_size, img_size); mlp_ratio 4 throughout, as in timm.
_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
          "large": (1024, 24, 16), "huge": (1280, 32, 16)}
_VARIANTS = [
    ("tiny", 16, 224), ("tiny", 16, 384),
    ("small", 8, 224), ("small", 16, 224), ("small", 16, 384), ("small", 32, 224),
    ("base", 8, 224), ("base", 16, 224), ("base", 16, 384), ("base", 32, 224), ("base", 32, 384),
    ("large", 16, 224), ("large", 16, 384), ("large", 32, 224),
    ("huge", 14, 224),
]
ARCHS: dict[str, dict[str, Any]] = {
    f"vit_{size}_patch{patch}_{img}": dict(
        embed_dim=_SIZES[size][0], depth=_SIZES[size][1], num_heads=_SIZES[size][2],
        mlp_ratio=4.0, patch_size=patch, img_size=img)
    for size, patch, img in _VARIANTS
}
# Small models for CPU runs, tests and the quickstart (not timm names; timm builds them from the
# exported arguments all the same).
ARCHS["vit_micro_patch4_32"] = dict(embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0, patch_size=4, img_size=32)
ARCHS["vit_nano_patch4_16"] = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=4, img_size=16)

TIMM_NAMES = {name for name in ARCHS if not name.startswith(("vit_micro", "vit_nano"))}


def list_models() -> list[str]:
    return sorted(ARCHS)


def resolve_arch(model_cfg) -> dict[str, Any]:
    """The architecture numbers for a ModelConfig: the registered ones with explicit fields on top."""
    if model_cfg.arch not in ARCHS:
        raise UserError(f"config key model.arch: unknown architecture {model_cfg.arch!r}; "
                        f"registered: {', '.join(list_models())}")
    arch = dict(ARCHS[model_cfg.arch])
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        value = getattr(model_cfg, key)
        if value is not None:
            arch[key] = value
    return arch


def model_kwargs(model_cfg, num_classes: int) -> dict[str, Any]:
    """Keyword arguments of `create_model` for a ModelConfig and a resolved class count."""
    return dict(
        resolve_arch(model_cfg), num_classes=num_classes, in_chans=model_cfg.in_chans,
        global_pool=model_cfg.global_pool, pos_embed=model_cfg.pos_embed, qkv_bias=model_cfg.qkv_bias,
        reg_tokens=model_cfg.reg_tokens, init_values=model_cfg.init_values, qk_norm=model_cfg.qk_norm,
        mlp=model_cfg.mlp, drop_path_rate=model_cfg.drop_path_rate, grad_checkpointing=model_cfg.grad_checkpointing)


def mlp_layers(mlp: str) -> dict[str, Any]:
    """timm's block MLP arguments for `model.mlp`: 'gelu' (timm's default) or 'swiglu' (SwiGLUPacked + SiLU,
    as timm's DINOv2 and EVA-02 registrations build it)."""
    if mlp == "gelu":
        return {}
    if mlp == "swiglu":
        from timm.layers import SwiGLUPacked

        return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}
    raise UserError(f"mlp must be 'gelu' or 'swiglu', got {mlp!r}")


def create_model(name: str = "vit_base_patch16_224", **overrides) -> VisionTransformer:
    """A ViT by registered name; keyword arguments override the architecture's numbers or options.

    Options beyond timm's: `pos_embed="sincos"` (fixed 2-D sin-cos, frozen), `mlp` ('gelu' or 'swiglu',
    a name for timm's MLP layer arguments) and `grad_checkpointing`.
    """
    if name not in ARCHS:
        raise UserError(f"unknown architecture {name!r}; registered: {', '.join(list_models())}")
    kwargs = dict(ARCHS[name], num_classes=1000, global_pool="token", qkv_bias=True)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    pos_embed = kwargs.pop("pos_embed", "learned")
    grad_ckpt = kwargs.pop("grad_checkpointing", False)
    if pos_embed not in ("learned", "sincos"):
        raise UserError(f"pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
    kwargs.update(mlp_layers(kwargs.pop("mlp", "gelu")))
    model = VisionTransformer(**kwargs)
    if pos_embed == "sincos":
        init_sincos_pos_embed(model)
    if grad_ckpt:
        model.set_grad_checkpointing(True)
    return model


def init_sincos_pos_embed(model: VisionTransformer) -> None:
    """Fill pos_embed with fixed 2-D sin-cos values (zeros for the class token) and freeze it."""
    grid = model.patch_embed.grid_size
    dim = model.pos_embed.shape[-1]
    emb = build_sincos2d_pos_embed(list(grid), dim=dim)  # (H*W, D)
    n_prefix = model.pos_embed.shape[1] - emb.shape[0]
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, n_prefix:] = emb.to(model.pos_embed.dtype)
    model.pos_embed.requires_grad_(False)


def load_weights(model: VisionTransformer, state_dict: dict[str, torch.Tensor], *, new_head: bool = False):
    """Load timm-keyed weights, resampling position embeddings (and patch embedding) to the model's grid.

    `new_head=True` drops the source head so the model keeps its freshly initialised one (fine-tuning
    onto another class count). Returns timm's (missing, unexpected) keys; anything else missing raises.
    """
    state_dict = dict(state_dict)
    if new_head:
        for k in [k for k in state_dict if k.startswith("head.")]:
            del state_dict[k]
    # An encoder trained with class-token pooling keeps its final norm in `norm`; timm's average
    # pooling model holds that norm in `fc_norm` (and `norm` is Identity): carry it across.
    if isinstance(model.norm, torch.nn.Identity) and "fc_norm.weight" not in state_dict:
        for k in ("weight", "bias"):
            if f"norm.{k}" in state_dict:
                state_dict[f"fc_norm.{k}"] = state_dict.pop(f"norm.{k}")
    # timm's own filter resamples pos_embed to the new grid and patch_embed to a new patch size.
    state_dict = checkpoint_filter_fn(state_dict, model)
    hint = "; set the model.* options (size, reg_tokens, init_values, qk_norm, mlp) of the run that made them"
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches, e.g. weights with register tokens into a model without
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:2])
        raise UserError(f"weights do not fit the model: {detail}{hint}") from None
    allowed_missing = {"head.weight", "head.bias"} if new_head else set()
    bad_missing = [k for k in missing if k not in allowed_missing]
    if bad_missing or unexpected:
        raise UserError(f"weights do not fit the model: missing {bad_missing[:5]}, unexpected {unexpected[:5]}{hint}")
    return missing, unexpected


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def block_flops(tokens: int, dim: int, hidden: float) -> float:
    """Forward FLOPs of one pre-norm transformer block on `tokens` tokens (2 per multiply-add).

    qkv projection, attention scores and weighted sum, output projection, two MLP matmuls; norms,
    softmax and activations are left out (under 1% at ViT sizes), as in the usual MFU accounting.
    """
    n, d = tokens, dim
    return float(2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * hidden)


def flops_per_image(model: VisionTransformer, tokens: int | None = None) -> float:
    """Forward FLOPs of one image through a timm ViT: patch embedding, blocks and head.

    `tokens` overrides the token count through the blocks (MAE's encoder sees only visible patches).
    Training costs about 3x this (forward + backward).
    """
    d = model.embed_dim
    n = tokens if tokens is not None else model.patch_embed.num_patches + model.num_prefix_tokens
    mlp = model.blocks[0].mlp
    # GELU: fc1 d->H, fc2 H->d. SwiGLUPacked: fc1 d->H (value and gate), fc2 H/2->d; the mean counts both
    hidden = (mlp.fc1.out_features + mlp.fc2.in_features) / 2
    n_patches = n - model.num_prefix_tokens
    patch = 2 * n_patches * d * math.prod(model.patch_embed.proj.weight.shape[1:])
    head = 2 * d * model.num_classes if model.num_classes else 0
    return float(len(model.blocks) * block_flops(n, d, hidden) + patch + head)


__all__ = ["ARCHS", "TIMM_NAMES", "create_model", "list_models", "resolve_arch", "model_kwargs",
           "load_weights", "init_sincos_pos_embed", "num_params", "flops_per_image", "block_flops"]
