"""The ViT family: timm's VisionTransformer under registered names, with our few options on top.

Names mirror timm's, so a checkpoint exported from `vit_base_patch16_224` loads into
`timm.create_model("vit_base_patch16_224")` unchanged. Attention uses timm's fused path
(torch.nn.functional.scaled_dot_product_attention).
"""
from __future__ import annotations

import math
from typing import Any

import torch

import pretrain._compat  # noqa: F401  before timm: makes it importable on a CPU-only torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from pretrain.errors import UserError
from pretrain.models.archs import CONV_STEM_STRIDE, check_arch, registered


def mlp_layers(mlp: str) -> dict[str, Any]:
    """timm's block MLP arguments for `model.mlp`: 'gelu' (timm's default) or 'swiglu' (SwiGLUPacked + SiLU,
    as timm's DINOv2 and EVA-02 registrations build it)."""
    if mlp != "swiglu":
        return {}
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


def conv_stem_layers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's hybrid patch embedding for `model.conv_stem`: the ResNetV2 stem (7x7 stride-2 weight-standardised
    conv, GroupNorm, ReLU, 3x3 stride-2 max-pool, 64 channels) then a patch_size/4 projection, exactly what
    timm's `vit_tiny_r_s16_p8_224` registration builds, so plain timm rebuilds it from arguments alone."""
    from functools import partial

    from timm.layers import HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import create_resnetv2_stem

    patch = kwargs["patch_size"]  # a multiple of the stride (check_arch)
    stem = create_resnetv2_stem(kwargs.get("in_chans", 3), stem_type="same", preact=False,
                                conv_layer=partial(StdConv2dSame, eps=1e-8))
    return {"embed_layer": partial(HybridEmbed, backbone=stem), "patch_size": patch // CONV_STEM_STRIDE}


def eva_kwargs(kwargs: dict[str, Any], pos_embed: str, mlp: str) -> dict[str, Any]:
    """timm `Eva` arguments for a ViT with 2-D rotary position embeddings (`model.rope`), from our ViT ones.

    RoPE rotates queries and keys by each patch's (row, column) in every block ('cat' layout, EVA-02);
    `ref_feat_shape` is the model's own grid, so coordinates are the patch indices. SwiGLU is Eva's packed
    GluMlp, whose `mlp_ratio` counts one half: half of ours, so both give the same layer.
    """
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
    `grad_checkpointing`. The combination must pass `check_arch` (UserError naming the model.* key).
    """
    kwargs = dict(registered(name), num_classes=1000, global_pool="token", qkv_bias=True)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    check_arch(kwargs)
    pos_embed = kwargs.pop("pos_embed", "learned")
    grad_ckpt = kwargs.pop("grad_checkpointing", False)
    rope = kwargs.pop("rope", False)
    conv_stem = kwargs.pop("conv_stem", False)
    mlp = kwargs.pop("mlp", "gelu")
    if rope:
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


__all__ = ["create_model", "load_weights", "init_sincos_pos_embed", "num_params", "flops_per_image", "block_flops"]
