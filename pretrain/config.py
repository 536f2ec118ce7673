"""One typed tree of dataclasses for every run; YAML with `_base_` inheritance; dotted CLI overrides.

Loading order: the dataclass defaults (mirrored in configs/default.yaml), then each `_base_` file
(relative to the file naming it, depth first), then the file itself, then `key.sub=value` overrides.
Unknown keys, wrong types and impossible values raise `UserError` naming the dotted key.
Derived values (effective batch, scaled lr, step counts) are computed by the engine, never written here.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import fsspec
import yaml

from pretrain.errors import UserError, first_line


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the run directory is `<out_dir>/<name>`."""
    out_dir: str = "runs"
    """Parent folder (any fsspec URL) of run directories."""
    seed: int = 0
    """Seed of everything random: init, shard order, shuffles, augmentations, masks."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; `auto` picks CUDA when present. CPU and GPU share one code path."""
    stop_check_steps: int = 1
    """Ranks agree on a stop signal (SIGTERM/SIGUSR1) every N optimizer steps, so a signal is honoured
    (checkpoint, exit 75) within N steps. The check is a CPU all-reduce (0.4 ms at 2 ranks, 1.5 ms at 4
    on a 2-core CPU box; not yet measured at scale): raise N where it shows in the step time, keeping
    N steps plus a checkpoint inside the pre-emption grace time. One process checks every step."""


@dataclass
class ModelConfig:
    arch: str = "vit_tiny_patch16_224"
    """A registered architecture name (see `pretrain.models.list_models()`); fields below override it."""
    img_size: Optional[int] = None
    """Input side in pixels; None keeps the architecture's."""
    patch_size: Optional[int] = None
    """Patch side in pixels; None keeps the architecture's. img_size must be a multiple of it."""
    embed_dim: Optional[int] = None
    """Token width; None keeps the architecture's."""
    depth: Optional[int] = None
    """Number of transformer blocks; None keeps the architecture's."""
    num_heads: Optional[int] = None
    """Attention heads; must divide embed_dim. None keeps the architecture's."""
    mlp_ratio: Optional[float] = None
    """MLP hidden width over embed_dim; None keeps the architecture's."""
    in_chans: int = 3
    """Input channels (grey images are expanded to 3 by the decoder)."""
    num_classes: Optional[int] = None
    """Classifier outputs; None takes the class count from the training shard index (0 = no head)."""
    global_pool: Literal["token", "avg"] = "token"
    """Pooling for the head: the class token, or the mean of patch tokens (MAE fine-tuning)."""
    pos_embed: Literal["learned", "sincos", "none"] = "learned"
    """Absolute position embeddings: learned, fixed 2-D sin-cos (frozen, as in MAE), or none (positions come
    only from `rope`, or from nothing at all)."""
    qkv_bias: bool = True
    """Bias on the attention q/k/v projection."""
    reg_tokens: int = 0
    """Register tokens (Darcet et al., 2023): learned tokens after the class token that give global computation
    a place other than background patches; DINOv2-reg uses 4. 0 = none."""
    init_values: Optional[float] = None
    """LayerScale (CaiT): each block's residual branches are scaled per channel, starting at this value
    (1e-5 in DINOv2 and deep ViTs, 0.1 for small ones); None = no LayerScale."""
    qk_norm: bool = False
    """LayerNorm on queries and keys per head (ViT-22B): steadies the attention logits at large sizes and lrs."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """Block MLP: GELU, or SwiGLU (timm's SwiGLUPacked with SiLU, as DINOv2 and EVA-02). SwiGLU's first layer
    holds value and gate, so its hidden width is mlp_ratio * embed_dim / 2: mlp_ratio 5.33 matches GELU at 4."""
    rope: bool = False
    """2-D rotary position embeddings in every block (timm's `Eva`, EVA-02's 'cat' layout): queries and keys are
    rotated by each patch's row and column. Exports load as timm's `eva02_tiny_patch14_224` with explicit sizes."""
    conv_stem: bool = False
    """Convolutional stem before the patch projection (timm's hybrid embedding with the ResNetV2 stem: 7x7 stride-2
    conv, GroupNorm, ReLU, stride-2 max-pool, as timm's `vit_tiny_r_s16_p8_224`); patch_size stays the pixel side
    of a token and must be a multiple of 4. Not with MAE (it would see masked pixels), rope or mlp=swiglu."""
    dynamic_img_size: bool = False
    """Accept any input size (a multiple of patch_size) at run time: position embeddings are resampled to the
    input's grid in forward (timm's `dynamic_img_size`). Weights loaded at another img_size are resampled once
    at load either way."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate at the last block (linearly increasing over depth)."""
    patch_drop_rate: float = 0.0
    """Patch dropout (FLIP): the fraction of patch tokens dropped at random per image in training (timm's
    `patch_drop_rate`; class and register tokens are kept); 0 = off. Supervised and fine-tune only: MAE already
    masks, and a linear probe's frozen encoder runs in eval mode."""
    grad_checkpointing: bool = False
    """Recompute transformer blocks in backward to save activation memory."""
    compile: bool = False
    """torch.compile each transformer block (ZeRO stages 0-2)."""


@dataclass
class TaskConfig:
    kind: Literal["supervised", "mae", "finetune", "linprobe"] = "supervised"
    """The objective: supervised classification, MAE pretraining, fine-tuning or linear probing."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy (classification tasks); in [0, 1)."""
    mixup_alpha: float = 0.0
    """Mixup alpha (0 = off), through timm's Mixup on the batch."""
    cutmix_alpha: float = 0.0
    """CutMix alpha (0 = off)."""
    mixup_prob: float = 1.0
    """Probability of applying mixup or cutmix to a batch."""
    mixup_switch_prob: float = 0.5
    """Probability of cutmix rather than mixup when both are on."""


@dataclass
class MaeConfig:
    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder; in (0, 1)."""
    norm_pix_loss: bool = True
    """Normalise each target patch by its own mean and variance (the MAE paper's best setting)."""
    decoder_embed_dim: int = 512
    """Decoder token width."""
    decoder_depth: int = 8
    """Decoder transformer blocks."""
    decoder_num_heads: int = 16
    """Decoder attention heads; must divide decoder_embed_dim."""


@dataclass
class FinetuneConfig:
    init_from: str = ""
    """Exported `.safetensors` file or run directory to initialise the encoder from (finetune, linprobe)."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay (timm's helper); 1.0 = off, MAE fine-tunes ViT-B with 0.65."""
    ema_decay: float = 0.0
    """Weight EMA decay (0 = off), e.g. 0.9999."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate on `data.val_urls` every N steps (0 = only at the end, if val_urls is set)."""
    knn_every_steps: int = 0
    """k-NN monitor of encoder features every N steps (0 = off); needs knn_train_urls and knn_val_urls."""
    knn_train_urls: str = ""
    """Small labelled shards whose features form the k-NN memory."""
    knn_val_urls: str = ""
    """Small labelled shards classified by k-NN."""
    knn_k: int = 20
    """Neighbours in the weighted k-NN vote."""
    knn_temperature: float = 0.07
    """Temperature of the k-NN similarity weights."""


@dataclass
class DataConfig:
    train_urls: Union[str, list[str]] = ""
    """Training shards: brace pattern, glob, list, or a `<split>.json` index; any fsspec URL or `pipe:`."""
    val_urls: Union[str, list[str]] = ""
    """Validation shards, same forms as train_urls ('' = none)."""
    mode: Literal["epochs", "resampled"] = "epochs"
    """`epochs`: each sample once per epoch; `resampled`: an endless stream of shards drawn with replacement."""
    samples_per_epoch: int = 0
    """Resampled mode: samples per "epoch" (0 = the index's sample count)."""
    batch_size: int = 64
    """Micro-batch per device (DeepSpeed's train_micro_batch_size_per_gpu)."""
    workers: int = 4
    """Data-loader worker processes per rank."""
    shuffle_block: int = 2048
    """Samples shuffled together within a worker's range (bigger mixes better, costs memory)."""
    shuffle_mb: int = 64
    """Cap on one worker's block of raw samples in MB: the block shrinks below shuffle_block when the shard
    index's mean sample size says it would hold more (0 = no cap; shards listed without an index: no cap)."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range (MAE uses [0.2, 1.0])."""
    hflip: float = 0.5
    """Horizontal flip probability."""
    auto_augment: str = ""
    """timm auto-augment policy for supervised training, e.g. `rand-m9-mstd0.5-inc1` ('' = off)."""
    color_jitter: float = 0.0
    """Colour jitter strength (0 = off)."""
    reprob: float = 0.0
    """Random-erasing probability (supervised)."""
    eval_crop_pct: float = 0.875
    """Eval resize is img_size / eval_crop_pct, then a centre crop of img_size."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Normalisation mean, applied on the device."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Normalisation std, applied on the device."""
    max_bad_fraction: float = 0.01
    """Stop with an error once more than this fraction of samples read is corrupt or unreadable."""


@dataclass
class OptimConfig:
    epochs: float = 1.0
    """Training length in epochs of the training shards (ignored if max_steps > 0)."""
    max_steps: int = 0
    """Training length in optimizer steps (0 = from epochs)."""
    lr_per_256: float = 1.5e-4
    """Base learning rate per 256 images; lr = lr_per_256 * effective_batch / 256 (MAE/DeiT rule)."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    warmup_steps: int = 0
    """Linear warm-up steps (takes precedence over warmup_epochs when > 0)."""
    warmup_epochs: float = 0.0
    """Linear warm-up in epochs."""
    weight_decay: float = 0.05
    """AdamW weight decay (never on biases, norms, position embeddings, class/mask tokens)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas (MAE pretraining uses [0.9, 0.95])."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this (0 = off)."""
    accum_steps: int = 1
    """Gradient accumulation micro-steps per optimizer step."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""
    impl: Literal["torch", "deepspeed"] = "torch"
    """AdamW implementation: `torch` (fused kernel on CUDA, nothing to compile) or `deepspeed` (FusedAdam,
    built with nvcc at first use). With deepspeed.offload_optimizer, DeepSpeed's CPU Adam either way."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    """ZeRO stage 0-3 (0 = plain data parallel)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: bf16 on a GPU with native bf16 (not V100/T4, which emulate it), fp32 on the CPU."""
    bf16_mode: Literal["autocast", "deepspeed"] = "autocast"
    """bf16 as torch.autocast over fp32 weights and gradients (`autocast`), or DeepSpeed's bf16 mode (bf16
    weights and gradients, fp32 master weights in the optimizer; gradients reduced in bf16, half the traffic)."""
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer states to CPU memory (stage >= 1)."""
    offload_params: bool = False
    """Offload parameters to CPU memory (stage 3 only)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward."""
    bucket_size: int = 0
    """Reduce / all-gather / prefetch bucket size in elements; 0 = sized from the model (a quarter of its
    parameters, at least hidden^2, at most 5e7), so small models do not allocate 200 MB buffers."""
    extra: dict = field(default_factory=dict)
    """Raw DeepSpeed config keys merged last, for what this tree does not cover."""


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Save every N optimizer steps (and always at the end and on SIGTERM/SIGUSR1)."""
    keep: int = 3
    """Checkpoints kept; older ones are deleted only after a newer one is complete."""
    resume: str = "auto"
    """`auto`: resume from the run directory's latest if any; `never`; or a checkpoint path."""


@dataclass
class LoggingConfig:
    every_steps: int = 10
    """Write metrics every N optimizer steps (scalars are read from the device only then)."""
    tensorboard: bool = True
    """Write TensorBoard events under `<run>/tb`."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    images_every_steps: int = 500
    """MAE reconstruction grid and attention maps every N steps (0 = off)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    mae: MaeConfig = field(default_factory=MaeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------- loading


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- `path` (with its `_base_` chain) <- `key=value` overrides, validated."""
    tree: dict = {}
    if path:
        tree = _load_yaml_chain(path, seen=())
    for item in overrides or []:
        _apply_override(tree, item)
    cfg = from_dict(tree)
    validate(cfg)
    return cfg


def split_config_args(config: Optional[str], overrides: list[str]) -> tuple[Optional[str], list[str]]:
    """`CONFIG key=v ...` or just `key=v ...` (the command line's form): a first argument with '=' is an
    override, not a file."""
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, list(overrides)


def from_dict(tree: dict) -> Config:
    """Build a Config from a nested dict, type-checking each value against its field."""
    return _build(Config, tree, prefix="")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def _read_text(path: str) -> str:
    try:
        with fsspec.open(path, "r") as f:
            return f.read()
    except FileNotFoundError:
        first = path.split(".", 1)[0]
        if "/" not in path and "." in path and first in {f.name for f in dataclasses.fields(Config)}:
            raise UserError(f"{path!r} is neither a config file nor a key=value override "
                            f"(e.g. {path}=VALUE)") from None
        raise UserError(f"config file not found: {path!r}") from None
    except IsADirectoryError:
        raise UserError(f"config file {path!r} is a folder; name a YAML file, e.g. "
                        "configs/pretrain/mae_vit_base_patch16.yaml") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path!r} is not UTF-8 text (byte {e.start}); name a YAML file") from None
    except PermissionError:
        raise UserError(f"config file {path!r} is not readable (permission denied)") from None


def _load_yaml_chain(path: str, seen: tuple) -> dict:
    if path in seen:
        raise UserError(f"_base_ cycle: {' -> '.join(seen + (path,))}")
    try:
        tree = yaml.safe_load(_read_text(path)) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({first_line(e)})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: top level must be a mapping of sections, got {type(tree).__name__}")
    bases = tree.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        base_path = base if "://" in base or base.startswith("/") else _join(_dirname(path), base)
        _deep_merge(merged, _load_yaml_chain(base_path, seen + (path,)))
    _deep_merge(merged, tree)
    return merged


def _dirname(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


def _join(a: str, b: str) -> str:
    return f"{a.rstrip('/')}/{b}"


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k != "extra":
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def _apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise UserError(f"override {item!r} is not key=value (e.g. optim.lr_per_256=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # e.g. a brace pattern that is not valid YAML: keep it as a string
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _build(cls, tree: Any, prefix: str):
    if not isinstance(tree, dict):
        where = f"config key {prefix.rstrip('.')}" if prefix else "config"
        raise UserError(f"{where}: got {tree!r}, expected a section (a mapping of keys); set its keys, "
                        f"e.g. {prefix or 'optim.'}KEY=VALUE")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in tree:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; allowed: {', '.join(names)}"
            raise UserError(f"unknown config key {prefix}{key}{hint}")
    kwargs = {}
    for name in names:
        if name not in tree:
            continue
        typ = hints[name]
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, tree[name], dotted + ".")
        else:
            kwargs[name] = _coerce(tree[name], typ, dotted)
    return cls(**kwargs)


def _type_name(typ) -> str:
    origin = typing.get_origin(typ)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(typ))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(typ))
    if origin is list:
        return f"list of {_type_name(typing.get_args(typ)[0])}"
    if typ is type(None):
        return "null"
    return getattr(typ, "__name__", str(typ))


def _coerce(value: Any, typ, dotted: str) -> Any:
    """Check `value` against `typ`, allowing only lossless conversions (int -> float)."""
    ok, out = _try_coerce(value, typ)
    if not ok:
        if isinstance(value, (float, str)) and _nonfinite(value):
            raise UserError(f"config key {dotted}: got {value!r}, expected a finite number")
        raise UserError(f"config key {dotted}: got {value!r}, expected {_type_name(typ)}")
    return out


def _nonfinite(value: Any) -> bool:
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _try_coerce(value: Any, typ) -> tuple[bool, Any]:
    origin = typing.get_origin(typ)
    if typ is Any:
        return True, value
    if origin is Literal:
        return (value in typing.get_args(typ)), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(typ):
            ok, out = _try_coerce(value, arg)
            if ok:
                return True, out
        return False, None
    if typ is type(None):
        return value is None, None
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            return False, None
        (item_t,) = typing.get_args(typ)
        out = []
        for v in value:
            ok, o = _try_coerce(v, item_t)
            if not ok:
                return False, None
            out.append(o)
        return True, out
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if typ is float:  # finite only: an inf or NaN setting only shows as a diverged run
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return math.isfinite(value), float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return math.isfinite(float(value)), float(value)
            except ValueError:
                return False, None
        return False, None
    if typ is str:
        return isinstance(value, str), value
    if typ is dict or origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, typ), value


# ----------------------------------------------------------------------------- validation


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise UserError(f"config key {key}: got {value!r}, {allowed}")


def validate(cfg: Config) -> None:
    """Cross-field and range checks; the first violation raises UserError naming its key."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.task
    from pretrain.models import resolve_arch  # late: models import timm

    arch = resolve_arch(cfg.model)  # raises UserError for an unknown arch
    img, patch = arch["img_size"], arch["patch_size"]
    _check(img > 0, "model.img_size", img, "must be positive")
    _check(patch > 0, "model.patch_size", patch, "must be positive")
    _check(img % patch == 0, "model.img_size", img, f"must be a multiple of model.patch_size ({patch})")
    _check(arch["embed_dim"] > 0, "model.embed_dim", arch["embed_dim"], "must be positive")
    _check(arch["depth"] > 0, "model.depth", arch["depth"], "must be positive")
    _check(arch["num_heads"] > 0 and arch["embed_dim"] % arch["num_heads"] == 0, "model.num_heads",
           arch["num_heads"], f"must divide model.embed_dim ({arch['embed_dim']})")
    _check(arch["mlp_ratio"] > 0, "model.mlp_ratio", arch["mlp_ratio"], "must be positive")
    _check(m.num_classes is None or m.num_classes >= 0, "model.num_classes", m.num_classes, "must be >= 0")
    _check(m.in_chans in (1, 3), "model.in_chans", m.in_chans, "must be 1 or 3")
    _check(m.reg_tokens >= 0, "model.reg_tokens", m.reg_tokens, "must be >= 0")
    _check(m.init_values is None or m.init_values > 0, "model.init_values", m.init_values,
           "must be positive, or null for no LayerScale")
    _check(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", m.drop_path_rate, "must be in [0, 1)")
    _check(0.0 <= m.patch_drop_rate < 1.0, "model.patch_drop_rate", m.patch_drop_rate, "must be in [0, 1)")
    from pretrain.models import model_kwargs

    opts = model_kwargs(m, 0)  # the options in effect: the config's, else the named architecture's
    if t.kind == "mae":
        _check(not opts["patch_drop_rate"], "model.patch_drop_rate", opts["patch_drop_rate"],
               "is for supervised training: MAE already hides mae.mask_ratio of the patches; set "
               "model.patch_drop_rate=0 (or raise mae.mask_ratio)")
        _check(not opts["conv_stem"], "model.conv_stem", True,
               "cannot be used with task.kind=mae: the stem's overlapping convolutions would carry masked pixels "
               "into visible patches; set model.conv_stem=false for MAE pretraining")
    if opts["mlp"] == "swiglu":
        hidden = int(arch["embed_dim"] * arch["mlp_ratio"])
        _check(hidden % 2 == 0, "model.mlp_ratio", arch["mlp_ratio"],
               f"gives an odd SwiGLU width ({hidden} = int(embed_dim x mlp_ratio)), which cannot hold value and gate "
               f"halves; pick a ratio giving an even width, e.g. {(hidden + 1) / arch['embed_dim'] + 1e-4:.4f}")
    if opts["conv_stem"]:
        _check(patch % 4 == 0, "model.patch_size", patch,
               "must be a multiple of 4 with model.conv_stem (the stem divides the image by 4)")
        _check(not opts["rope"], "model.rope", True,
               "cannot be combined with model.conv_stem (timm's Eva has no hybrid patch embedding); drop one")
        _check(opts["mlp"] == "gelu", "model.mlp", opts["mlp"],
               "must be gelu with model.conv_stem (no timm registration builds both, so an export could not "
               "load in plain timm); drop one")

    _check(0.0 <= t.label_smoothing < 1.0, "task.label_smoothing", t.label_smoothing, "must be in [0, 1)")
    _check(t.mixup_alpha >= 0, "task.mixup_alpha", t.mixup_alpha, "must be >= 0")
    _check(t.cutmix_alpha >= 0, "task.cutmix_alpha", t.cutmix_alpha, "must be >= 0")
    _check(0.0 <= t.mixup_prob <= 1.0, "task.mixup_prob", t.mixup_prob, "must be in [0, 1]")
    _check(0.0 <= t.mixup_switch_prob <= 1.0, "task.mixup_switch_prob", t.mixup_switch_prob, "must be in [0, 1]")

    ma = cfg.mae
    _check(0.0 < ma.mask_ratio < 1.0, "mae.mask_ratio", ma.mask_ratio, "must be in (0, 1), e.g. 0.75")
    _check(ma.decoder_embed_dim > 0, "mae.decoder_embed_dim", ma.decoder_embed_dim, "must be positive")
    _check(ma.decoder_depth > 0, "mae.decoder_depth", ma.decoder_depth, "must be positive")
    _check(ma.decoder_num_heads > 0 and ma.decoder_embed_dim % ma.decoder_num_heads == 0,
           "mae.decoder_num_heads", ma.decoder_num_heads,
           f"must divide mae.decoder_embed_dim ({ma.decoder_embed_dim})")

    f = cfg.finetune
    _check(0.0 < f.layer_decay <= 1.0, "finetune.layer_decay", f.layer_decay, "must be in (0, 1]")
    _check(0.0 <= f.ema_decay < 1.0, "finetune.ema_decay", f.ema_decay, "must be in [0, 1)")

    e = cfg.eval
    _check(e.every_steps >= 0, "eval.every_steps", e.every_steps, "must be >= 0")
    _check(e.knn_every_steps >= 0, "eval.knn_every_steps", e.knn_every_steps, "must be >= 0")
    _check(e.knn_k > 0, "eval.knn_k", e.knn_k, "must be positive")
    _check(e.knn_temperature > 0, "eval.knn_temperature", e.knn_temperature, "must be positive")
    if e.knn_every_steps:
        _check(bool(e.knn_train_urls and e.knn_val_urls), "eval.knn_train_urls", e.knn_train_urls,
               "eval.knn_train_urls and eval.knn_val_urls must be set when eval.knn_every_steps > 0")

    _check(d.batch_size > 0, "data.batch_size", d.batch_size, "must be positive")
    _check(d.workers >= 0, "data.workers", d.workers, "must be >= 0")
    _check(d.shuffle_block > 0, "data.shuffle_block", d.shuffle_block, "must be positive")
    _check(d.shuffle_mb >= 0, "data.shuffle_mb", d.shuffle_mb, "must be >= 0 (0 = no cap)")
    _check(d.samples_per_epoch >= 0, "data.samples_per_epoch", d.samples_per_epoch, "must be >= 0")
    _check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0, "data.crop_scale",
           d.crop_scale, "must be [lo, hi] with 0 < lo <= hi <= 1")
    _check(0.0 <= d.hflip <= 1.0, "data.hflip", d.hflip, "must be in [0, 1]")
    _check(0.0 <= d.reprob <= 1.0, "data.reprob", d.reprob, "must be in [0, 1]")
    _check(d.color_jitter >= 0, "data.color_jitter", d.color_jitter, "must be >= 0")
    _check(0.0 < d.eval_crop_pct <= 1.0, "data.eval_crop_pct", d.eval_crop_pct, "must be in (0, 1]")
    _check(len(d.mean) == m.in_chans, "data.mean", d.mean, f"must have model.in_chans ({m.in_chans}) values")
    _check(len(d.std) == m.in_chans and all(s > 0 for s in d.std), "data.std", d.std,
           f"must have model.in_chans ({m.in_chans}) positive values")
    _check(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", d.max_bad_fraction, "must be in [0, 1]")

    _check(o.epochs > 0 or o.max_steps > 0, "optim.epochs", o.epochs, "must be positive (or set optim.max_steps)")
    _check(o.max_steps >= 0, "optim.max_steps", o.max_steps, "must be >= 0")
    _check(o.lr_per_256 > 0, "optim.lr_per_256", o.lr_per_256, "must be positive")
    _check(0 <= o.min_lr, "optim.min_lr", o.min_lr, "must be >= 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "must be >= 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
           "must be two values in [0, 1)")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = off)")
    _check(o.accum_steps >= 1, "optim.accum_steps", o.accum_steps, "must be >= 1")
    _check(cfg.run.stop_check_steps >= 1, "run.stop_check_steps", cfg.run.stop_check_steps, "must be >= 1")
    _check(o.max_nonfinite_steps >= 1, "optim.max_nonfinite_steps", o.max_nonfinite_steps, "must be >= 1")

    z = cfg.deepspeed
    _check(z.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", z.zero_stage, "must be 0, 1, 2 or 3")
    _check(not z.offload_optimizer or z.zero_stage >= 1, "deepspeed.offload_optimizer", True,
           "needs deepspeed.zero_stage >= 1")
    _check(not z.offload_params or z.zero_stage == 3, "deepspeed.offload_params", True,
           "needs deepspeed.zero_stage == 3")
    _check(not m.compile or z.zero_stage <= 2, "model.compile", True,
           "needs deepspeed.zero_stage <= 2 (ZeRO-3 gathers parameters in hooks inside each block)")
    _check(z.bucket_size >= 0, "deepspeed.bucket_size", z.bucket_size, "must be >= 0 (0 = sized from the model)")

    c = cfg.checkpoint
    _check(c.every_steps >= 0, "checkpoint.every_steps", c.every_steps, "must be >= 0 (0 = only at the end)")
    _check(c.keep >= 1, "checkpoint.keep", c.keep, "must be >= 1")
    _check(c.resume != "", "checkpoint.resume", c.resume, "must be 'auto', 'never' or a checkpoint path")

    lg = cfg.logging
    _check(lg.every_steps >= 1, "logging.every_steps", lg.every_steps, "must be >= 1")
    _check(lg.images_every_steps >= 0, "logging.images_every_steps", lg.images_every_steps, "must be >= 0")

    if t.kind in ("finetune", "linprobe"):
        _check(bool(f.init_from), "finetune.init_from", f.init_from,
               f"must name an exported .safetensors file or a run directory for task.kind={t.kind}")


def field_docs(cls=Config, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the docstring written under the field (used by docs and the docs test)."""
    import ast
    import inspect

    src = inspect.getsource(cls)
    body = ast.parse(src).body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                doc = " ".join(nxt.value.value.split())  # one line, whatever the source wrapping
            docs[prefix + node.target.id] = doc
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(field_docs(hints[f.name], prefix + f.name + "."))
        else:
            out[prefix + f.name] = docs.get(prefix + f.name, "")
    return out


def render_default_yaml() -> str:
    """configs/default.yaml: every field at its default, each with its documentation as a comment."""
    docs = field_docs()
    lines = ["# Every field of the config tree at its default (generated by scripts/gen_config_docs.py;",
             "# tests/test_config.py fails if it drifts from pretrain/config.py). Experiment files",
             "# name this file in `_base_:` and hold only what differs.", ""]
    for section, values in to_dict(Config()).items():
        lines.append(f"{section}:")
        for key, value in values.items():
            lines.append(f"  # {docs[f'{section}.{key}']}")
            dumped = yaml.safe_dump({key: value}, default_flow_style=True, width=1000).strip()
            lines.append("  " + dumped[1:-1])
        lines.append("")
    return "\n".join(lines)


def render_reference_md() -> str:
    """docs/config.md: a table per section of key, type, default and documentation."""
    docs = field_docs()
    hints_of = {s.name: typing.get_type_hints(typing.get_type_hints(Config)[s.name]) for s in dataclasses.fields(Config)}
    out = ["# Config reference", "",
           "Generated from `pretrain/config.py` by `scripts/gen_config_docs.py`; a test fails if it drifts.",
           "Set any key in a YAML file (`section: {key: value}`) or on the command line as `section.key=value`.",
           ""]
    for section, values in to_dict(Config()).items():
        out += [f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, value in values.items():
            typ = _type_name(hints_of[section][key]).replace("|", "\\|")
            default = yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
            out.append(f"| `{section}.{key}` | {typ} | `{default}` | {docs[f'{section}.{key}']} |")
        out.append("")
    return "\n".join(out)
