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

TIMM_NAMES = {f"vit_{size}_patch{patch}_{img}" for size, patch, img in _VARIANTS}

# Named configurations: recipes' architectures with their options (not timm names; exports name timm's
# factories as for any options). A config field left at its default keeps the name's value.
_DINOV2_REG = dict(reg_tokens=4, init_values=1e-5)  # DINOv2 with registers (Darcet et al., 2023)
_EVA02 = dict(mlp="swiglu", rope=True)  # EVA-02: SwiGLU MLP (hidden 8/3 x width) and 2-D RoPE
for size in ("small", "base"):
    d, depth, heads = _SIZES[size]
    ARCHS[f"vit_{size}_patch14_reg4_ls_224"] = dict(
        embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=4.0, patch_size=14, img_size=224, **_DINOV2_REG)
    ARCHS[f"vit_{size}_patch14_rope_swiglu_224"] = dict(
        embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=16 / 3, patch_size=14, img_size=224, **_EVA02)
# their CPU twins, for tests and smoke runs (LayerScale at 0.1, as for small models)
ARCHS["vit_nano_patch4_reg4_ls_16"] = dict(ARCHS["vit_nano_patch4_16"], reg_tokens=4, init_values=0.1)
ARCHS["vit_nano_patch4_rope_swiglu_16"] = dict(ARCHS["vit_nano_patch4_16"], mlp_ratio=4.0, **_EVA02)


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


# Architecture options a ModelConfig passes to `create_model` (besides the numbers above); a registered
# name may set them too (the named configurations below), and a config field left at its default keeps
# the name's value.
OPTION_DEFAULTS: dict[str, Any] = dict(
    global_pool="token", pos_embed="learned", qkv_bias=True, reg_tokens=0, init_values=None, qk_norm=False,
    mlp="gelu", rope=False, conv_stem=False, dynamic_img_size=False, drop_path_rate=0.0, patch_drop_rate=0.0,
    grad_checkpointing=False)


def model_kwargs(model_cfg, num_classes: int) -> dict[str, Any]:
    """Keyword arguments of `create_model` for a ModelConfig and a resolved class count."""
    arch = resolve_arch(model_cfg)
    kwargs = dict(arch, num_classes=num_classes, in_chans=model_cfg.in_chans)
    for key, default in OPTION_DEFAULTS.items():
        value = getattr(model_cfg, key)
        kwargs[key] = value if value != default or key not in arch else arch[key]
    return kwargs


def mlp_layers(mlp: str) -> dict[str, Any]:
    """timm's block MLP arguments for `model.mlp`: 'gelu' (timm's default) or 'swiglu' (SwiGLUPacked + SiLU,
    as timm's DINOv2 and EVA-02 registrations build it)."""
    if mlp == "gelu":
        return {}
    if mlp == "swiglu":
        from timm.layers import SwiGLUPacked

        return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}
    raise UserError(f"mlp must be 'gelu' or 'swiglu', got {mlp!r}")


# The convolutional stem divides the image by 4 before the patch projection (stride-2 conv, stride-2 pool).
CONV_STEM_STRIDE = 4


def conv_stem_layers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's hybrid patch embedding for `model.conv_stem`: the ResNetV2 stem (7x7 stride-2 weight-standardised
    conv, GroupNorm, ReLU, 3x3 stride-2 max-pool, 64 channels) then a patch_size/4 projection, exactly what
    timm's `vit_tiny_r_s16_p8_224` registration builds, so plain timm rebuilds it from arguments alone."""
    from functools import partial

    from timm.layers import HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import create_resnetv2_stem

    patch = kwargs["patch_size"]
    if patch % CONV_STEM_STRIDE:
        raise UserError(f"conv_stem needs a patch_size that is a multiple of {CONV_STEM_STRIDE}, got {patch}")
    stem = create_resnetv2_stem(kwargs.get("in_chans", 3), stem_type="same", preact=False,
                                conv_layer=partial(StdConv2dSame, eps=1e-8))
    return {"embed_layer": partial(HybridEmbed, backbone=stem), "patch_size": patch // CONV_STEM_STRIDE}


def eva_kwargs(kwargs: dict[str, Any], pos_embed: str, mlp: str) -> dict[str, Any]:
    """timm `Eva` arguments for a ViT with 2-D rotary position embeddings (`model.rope`), from our ViT ones.

    RoPE rotates queries and keys by each patch's (row, column) in every block ('cat' layout, EVA-02);
    `ref_feat_shape` is the model's own grid, so coordinates are the patch indices. SwiGLU is Eva's packed
    GluMlp, whose `mlp_ratio` counts one half: half of ours, so both give the same layer.
    """
    if mlp not in ("gelu", "swiglu"):
        raise UserError(f"mlp must be 'gelu' or 'swiglu', got {mlp!r}")
    out = dict(kwargs)
    out["num_reg_tokens"] = out.pop("reg_tokens", 0)
    out["use_abs_pos_emb"] = pos_embed != "none"
    out["use_rot_pos_emb"] = True
    out["swiglu_mlp"] = mlp == "swiglu"
    if mlp == "swiglu":
        out["mlp_ratio"] = out["mlp_ratio"] / 2
    side = out["img_size"] // out["patch_size"]
    out["ref_feat_shape"] = (side, side)
    return out


def create_model(name: str = "vit_base_patch16_224", **overrides) -> torch.nn.Module:
    """A ViT by registered name; keyword arguments override the architecture's numbers or options.

    Options beyond timm's VisionTransformer arguments: `pos_embed` ('learned', 'sincos': fixed 2-D sin-cos,
    frozen; 'none'), `mlp` ('gelu' or 'swiglu', a name for timm's MLP layer arguments), `rope` (timm's `Eva`
    with 2-D rotary embeddings instead of a VisionTransformer), `conv_stem` (timm's hybrid embedding) and
    `grad_checkpointing`.
    """
    if name not in ARCHS:
        raise UserError(f"unknown architecture {name!r}; registered: {', '.join(list_models())}")
    kwargs = dict(ARCHS[name], num_classes=1000, global_pool="token", qkv_bias=True)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    pos_embed = kwargs.pop("pos_embed", "learned")
    grad_ckpt = kwargs.pop("grad_checkpointing", False)
    rope = kwargs.pop("rope", False)
    conv_stem = kwargs.pop("conv_stem", False)
    mlp = kwargs.pop("mlp", "gelu")
    if pos_embed not in ("learned", "sincos", "none"):
        raise UserError(f"pos_embed must be 'learned', 'sincos' or 'none', got {pos_embed!r}")
    if rope:
        if conv_stem:
            raise UserError("rope and conv_stem cannot be combined: timm's Eva has no hybrid patch embedding")
        from timm.models.eva import Eva

        model = Eva(**eva_kwargs(kwargs, pos_embed, mlp))
    else:
        kwargs.update(mlp_layers(mlp))
        if conv_stem:
            kwargs.update(conv_stem_layers(kwargs))
        if pos_embed == "none":
            kwargs["pos_embed"] = "none"
        model = VisionTransformer(**kwargs)
    if pos_embed == "sincos":
        init_sincos_pos_embed(model)
    if grad_ckpt:
        model.set_grad_checkpointing(True)
    return model


def init_sincos_pos_embed(model: torch.nn.Module) -> None:
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
    if _is_eva(model):
        from timm.models.eva import checkpoint_filter_fn as eva_filter

        state_dict = eva_filter(state_dict, model)
    else:
        state_dict = checkpoint_filter_fn(state_dict, model)
    hint = ("; set the model.* options (size, reg_tokens, init_values, qk_norm, mlp, pos_embed, rope, conv_stem) "
            "of the run that made them")
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


def _is_eva(model: torch.nn.Module) -> bool:
    return type(model).__name__ == "Eva"


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
