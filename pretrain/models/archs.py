"""The registered architecture names, their numbers and options, and the rules every architecture obeys.

Torch-free, so `vit-pretrain config` can reject an unknown or unsound architecture without importing
timm. `vit.py` builds what this table names; the rules below are written once and enforced both when
a config is checked (`check_model_config`) and when a model is built (`check_arch` in `create_model`).
"""
from __future__ import annotations

from typing import Any

from pretrain.config import ModelConfig, require
from pretrain.errors import UserError

# size -> (embed_dim, depth, num_heads); mlp_ratio 4 throughout, as in timm.
_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
          "large": (1024, 24, 16), "huge": (1280, 32, 16)}
# (size, patch_size, img_size) of timm's own registrations
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
for _size in ("small", "base"):
    _d, _depth, _heads = _SIZES[_size]
    ARCHS[f"vit_{_size}_patch14_reg4_ls_224"] = dict(
        embed_dim=_d, depth=_depth, num_heads=_heads, mlp_ratio=4.0, patch_size=14, img_size=224, **_DINOV2_REG)
    ARCHS[f"vit_{_size}_patch14_rope_swiglu_224"] = dict(
        embed_dim=_d, depth=_depth, num_heads=_heads, mlp_ratio=16 / 3, patch_size=14, img_size=224, **_EVA02)
# their CPU twins, for tests and smoke runs (LayerScale at 0.1, as for small models)
ARCHS["vit_nano_patch4_reg4_ls_16"] = dict(ARCHS["vit_nano_patch4_16"], reg_tokens=4, init_values=0.1)
ARCHS["vit_nano_patch4_rope_swiglu_16"] = dict(ARCHS["vit_nano_patch4_16"], mlp_ratio=4.0, **_EVA02)

# The architecture numbers a ModelConfig field may override (None keeps the name's).
NUMBERS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")

# Architecture options a ModelConfig passes to `create_model` (besides the numbers above); a registered
# name may set them too (the named configurations above), and a config field left at its default keeps
# the name's value.
OPTION_DEFAULTS: dict[str, Any] = dict(
    global_pool="token", pos_embed="learned", qkv_bias=True, reg_tokens=0, init_values=None, qk_norm=False,
    mlp="gelu", rope=False, conv_stem=False, dynamic_img_size=False, drop_path_rate=0.0, patch_drop_rate=0.0,
    grad_checkpointing=False)

POS_EMBEDS = ("learned", "sincos", "none")
MLPS = ("gelu", "swiglu")

# The convolutional stem divides the image by 4 before the patch projection (stride-2 conv, stride-2 pool).
CONV_STEM_STRIDE = 4


def list_models() -> list[str]:
    return sorted(ARCHS)


def registered(name: str) -> dict[str, Any]:
    """A copy of the registered numbers and options of `name`; an unknown name is a user error."""
    if name not in ARCHS:
        raise UserError(f"config key model.arch: unknown architecture {name!r}; registered: {', '.join(list_models())}")
    return dict(ARCHS[name])


def resolve_arch(model_cfg: ModelConfig) -> dict[str, Any]:
    """The architecture numbers for a ModelConfig: the registered ones with explicit fields on top."""
    arch = registered(model_cfg.arch)
    for key in NUMBERS:
        value = getattr(model_cfg, key)
        if value is not None:
            arch[key] = value
    return arch


def model_kwargs(model_cfg: ModelConfig, num_classes: int) -> dict[str, Any]:
    """Keyword arguments of `create_model` for a ModelConfig and a resolved class count."""
    arch = resolve_arch(model_cfg)
    kwargs = dict(arch, num_classes=num_classes, in_chans=model_cfg.in_chans)
    for key, default in OPTION_DEFAULTS.items():
        value = getattr(model_cfg, key)
        kwargs[key] = value if value != default or key not in arch else arch[key]
    return kwargs


def check_model_config(model_cfg: ModelConfig, task_kind: str) -> None:
    """The architecture a config's `model` section resolves to is sound, and fits `task.kind`: the
    registered name exists, its numbers with the explicit fields on top agree, and the options in
    effect (the config's, else the name's) combine. Raises UserError naming the key."""
    opts = model_kwargs(model_cfg, 0)
    check_arch(opts)
    if task_kind == "mae":
        require(not opts["patch_drop_rate"], "model.patch_drop_rate", opts["patch_drop_rate"],
                "is for supervised training: MAE already hides mae.mask_ratio of the patches; set "
                "model.patch_drop_rate=0 (or raise mae.mask_ratio)")
        require(not opts["conv_stem"], "model.conv_stem", True,
                "cannot be used with task.kind=mae: the stem's overlapping convolutions would carry masked pixels "
                "into visible patches; set model.conv_stem=false for MAE pretraining")


def check_arch(opts: dict[str, Any]) -> None:
    """The rules every architecture obeys, on the numbers and options in effect (`create_model`'s keyword
    arguments; an option left out takes its default). Raises UserError naming the model.* key."""
    img, patch, dim, heads, ratio = (opts[k] for k in ("img_size", "patch_size", "embed_dim", "num_heads", "mlp_ratio"))
    for key in NUMBERS:
        require(opts[key] > 0, f"model.{key}", opts[key], "must be positive")
    require(img % patch == 0, "model.img_size", img, f"must be a multiple of model.patch_size ({patch})")
    require(dim % heads == 0, "model.num_heads", heads, f"must divide model.embed_dim ({dim})")
    pos_embed, mlp = opts.get("pos_embed", "learned"), opts.get("mlp", "gelu")
    require(pos_embed in POS_EMBEDS, "model.pos_embed", pos_embed, f"expected one of {', '.join(POS_EMBEDS)}")
    require(mlp in MLPS, "model.mlp", mlp, f"expected one of {', '.join(MLPS)}")
    if mlp == "swiglu":
        hidden = int(dim * ratio)
        require(hidden % 2 == 0, "model.mlp_ratio", ratio,
                f"gives an odd SwiGLU width ({hidden} = int(embed_dim x mlp_ratio)), which cannot hold value and gate "
                f"halves; pick a ratio giving an even width, e.g. {(hidden + 1) / dim + 1e-4:.4f}")
    if opts.get("conv_stem"):
        require(patch % CONV_STEM_STRIDE == 0, "model.patch_size", patch,
                f"must be a multiple of {CONV_STEM_STRIDE} with model.conv_stem (the stem divides the image by "
                f"{CONV_STEM_STRIDE})")
        require(not opts.get("rope"), "model.rope", True,
                "cannot be combined with model.conv_stem (timm's Eva has no hybrid patch embedding); drop one")
        require(mlp == "gelu", "model.mlp", mlp,
                "must be gelu with model.conv_stem (no timm registration builds both, so an export could not "
                "load in plain timm); drop one")
