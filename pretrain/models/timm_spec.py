"""Which plain-timm registration and arguments rebuild each of our architectures and model options:
what an export writes into its JSON, so that `timm.create_model(name, **kwargs)` loads its weights."""
from __future__ import annotations

from typing import Any

from pretrain.models.archs import ARCHS, CONV_STEM_STRIDE, TIMM_NAMES
from pretrain.models.vit import eva_kwargs

# Arguments of timm's VisionTransformer that define the inference architecture (drop path is a
# training-time option, our `pos_embed`/`grad_checkpointing` are not timm's).
ARCH_KEYS = ("img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth",
             "num_heads", "mlp_ratio", "qkv_bias")
# Architecture options (model.reg_tokens, init_values, qk_norm), exported only when set, so exports
# without them keep their arguments.
OPTION_KEYS = ("reg_tokens", "init_values", "qk_norm")
# timm's generic name for non-timm sizes: every architecture number is passed explicitly, so the
# name only picks timm's ViT factory (and its default pretrained config).
GENERIC_TIMM_NAME = "vit_base_patch16_224"
# The factory for a SwiGLU MLP: JSON cannot name timm's layer classes, but this registration passes
# mlp_layer=SwiGLUPacked and act_layer=SiLU itself; its other defaults (LayerScale 1e-5, size) are
# overridden by the explicit arguments.
SWIGLU_TIMM_NAME = "vit_giant_patch14_dinov2"
# `model.rope`: timm's Eva. This registration's defaults (EVA-02 sizes, SwiGLU, RoPE, ref_feat_shape) are all
# overridden by explicit arguments.
ROPE_TIMM_NAME = "eva02_tiny_patch14_224"
# `model.conv_stem`: the hybrid ViT whose stem is ResNetV2's (no stages), as `pretrain.models.vit` builds it.
CONV_STEM_TIMM_NAME = "vit_tiny_r_s16_p8_224"


def timm_spec(name: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(timm model name, keyword arguments) that rebuild the architecture in plain timm."""
    full = dict(ARCHS.get(name, {}), num_classes=1000, global_pool="token", qkv_bias=True)
    full.update({k: v for k, v in kwargs.items() if v is not None})
    out = {k: full[k] for k in ARCH_KEYS if k in full}
    out.update({k: full[k] for k in OPTION_KEYS if full.get(k)})
    if full.get("dynamic_img_size"):
        out["dynamic_img_size"] = True
    pos_embed, mlp = full.get("pos_embed", "learned"), full.get("mlp", "gelu")
    if full.get("rope"):
        eva = eva_kwargs(out, pos_embed, mlp)
        eva["ref_feat_shape"] = list(eva["ref_feat_shape"])  # JSON
        return ROPE_TIMM_NAME, eva
    if pos_embed == "none":
        out["pos_embed"] = "none"
    if full.get("conv_stem"):
        out["patch_size"] = full["patch_size"] // CONV_STEM_STRIDE  # over the stem's stride-4 feature map
        return CONV_STEM_TIMM_NAME, out
    if mlp == "swiglu":
        # no LayerScale must override the factory's 1e-5: timm.create_model drops None arguments, and
        # its Block builds LayerScale only for a truthy init_values, so 0.0 says "none"
        out["init_values"] = full.get("init_values") or 0.0
        return SWIGLU_TIMM_NAME, out
    return (name if name in TIMM_NAMES else GENERIC_TIMM_NAME), out
