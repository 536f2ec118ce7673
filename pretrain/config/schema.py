"""The config tree: one dataclass per section, each field documented right under it, each section's
own rules in its `check()`; `validate` adds the rules that span sections.

What the model section names (the architecture's numbers and how its options combine) is checked by
`pretrain.models.check_model_config`, which knows the registered architectures.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pretrain.errors import UserError


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise `config key KEY: got VALUE, ALLOWED` unless `ok` (the one form of a bad-value message)."""
    if not ok:
        raise UserError(f"config key {key}: got {value!r}, {allowed}")


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
    """Ranks vote on a stop signal (SIGTERM/SIGUSR1) every N optimizer steps: a non-blocking CPU all-reduce
    started after the step and answered N steps later, so its network latency hides behind N steps of
    training and every rank stops after the same step. A signal is honoured (checkpoint, exit 75) within
    2N steps: keep 2N steps plus a checkpoint inside the pre-emption warning; raise N when a vote takes
    longer than N steps (thousands of ranks: docs/scaling.md). One process checks every step."""

    def check(self) -> None:
        require(self.stop_check_steps >= 1, "run.stop_check_steps", self.stop_check_steps, "must be >= 1")


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
    compile: Union[bool, Literal["auto"]] = False
    """torch.compile each transformer block (ZeRO stages 0-2). `auto`: on for CUDA at ZeRO 0-2, off on the CPU
    and at ZeRO 3 (an info line says so), resolved once at start and logged in `derived:`. The default stays
    false until the compiled step is measured faster on a GPU (`bench gpu`); the first compiled steps pay
    the compile (logged as warm-up), later runs of the same run directory reuse its compile cache."""
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    """SDPA kernel for attention: `auto` keeps torch's choice; the others pin that backend around the forward
    (torch.nn.attention.sdpa_kernel; the backward follows the forward's kernel). A pinned backend is tried at
    start on the model's attention shapes and dtype, and refused (exit 2) where it cannot run: on the CPU
    `efficient` and `cudnn`. On CUDA the log names the kernel serving the encoder's (and MAE's decoder's)
    attention."""

    def check(self) -> None:
        """Each field's own range; the architecture the fields resolve to is models' to check."""
        require(self.num_classes is None or self.num_classes >= 0, "model.num_classes", self.num_classes,
                "must be >= 0")
        require(self.in_chans in (1, 3), "model.in_chans", self.in_chans, "must be 1 or 3")
        require(self.reg_tokens >= 0, "model.reg_tokens", self.reg_tokens, "must be >= 0")
        require(self.init_values is None or self.init_values > 0, "model.init_values", self.init_values,
                "must be positive, or null for no LayerScale")
        require(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", self.drop_path_rate, "must be in [0, 1)")
        require(0.0 <= self.patch_drop_rate < 1.0, "model.patch_drop_rate", self.patch_drop_rate, "must be in [0, 1)")


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

    def check(self) -> None:
        require(0.0 <= self.label_smoothing < 1.0, "task.label_smoothing", self.label_smoothing, "must be in [0, 1)")
        require(self.mixup_alpha >= 0, "task.mixup_alpha", self.mixup_alpha, "must be >= 0")
        require(self.cutmix_alpha >= 0, "task.cutmix_alpha", self.cutmix_alpha, "must be >= 0")
        require(0.0 <= self.mixup_prob <= 1.0, "task.mixup_prob", self.mixup_prob, "must be in [0, 1]")
        require(0.0 <= self.mixup_switch_prob <= 1.0, "task.mixup_switch_prob", self.mixup_switch_prob,
                "must be in [0, 1]")


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

    def check(self) -> None:
        require(0.0 < self.mask_ratio < 1.0, "mae.mask_ratio", self.mask_ratio, "must be in (0, 1), e.g. 0.75")
        require(self.decoder_embed_dim > 0, "mae.decoder_embed_dim", self.decoder_embed_dim, "must be positive")
        require(self.decoder_depth > 0, "mae.decoder_depth", self.decoder_depth, "must be positive")
        require(self.decoder_num_heads > 0 and self.decoder_embed_dim % self.decoder_num_heads == 0,
                "mae.decoder_num_heads", self.decoder_num_heads,
                f"must divide mae.decoder_embed_dim ({self.decoder_embed_dim})")


@dataclass
class FinetuneConfig:
    init_from: str = ""
    """Exported `.safetensors` file or run directory to initialise the encoder from (finetune, linprobe)."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay (timm's helper); 1.0 = off, MAE fine-tunes ViT-B with 0.65."""
    ema_decay: float = 0.0
    """Weight EMA decay (0 = off), e.g. 0.9999."""

    def check(self) -> None:
        require(0.0 < self.layer_decay <= 1.0, "finetune.layer_decay", self.layer_decay, "must be in (0, 1]")
        require(0.0 <= self.ema_decay < 1.0, "finetune.ema_decay", self.ema_decay, "must be in [0, 1)")


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

    def check(self) -> None:
        require(self.every_steps >= 0, "eval.every_steps", self.every_steps, "must be >= 0")
        require(self.knn_every_steps >= 0, "eval.knn_every_steps", self.knn_every_steps, "must be >= 0")
        require(self.knn_k > 0, "eval.knn_k", self.knn_k, "must be positive")
        require(self.knn_temperature > 0, "eval.knn_temperature", self.knn_temperature, "must be positive")
        if self.knn_every_steps:
            require(bool(self.knn_train_urls and self.knn_val_urls), "eval.knn_train_urls", self.knn_train_urls,
                    "eval.knn_train_urls and eval.knn_val_urls must be set when eval.knn_every_steps > 0")


@dataclass
class SourceConfig:
    train_urls: Union[str, list[str]] = ""
    """This source's shards, in any form data.train_urls takes."""
    weight: float = 1.0
    """Its share of every mixture epoch: weight / the sum of the sources' weights (at least 1/1000)."""
    name: str = ""
    """Its name in metrics and TensorBoard (`data/<name>/samples`, `.../bad`); '' = source<i>."""


@dataclass
class DataConfig:
    train_urls: Union[str, list[str]] = ""
    """Training shards: brace pattern, glob, list, or a `<split>.json` index; any fsspec URL or `pipe:`."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture instead of train_urls: `[{train_urls: ..., weight: 0.7, name: web}, ...]`. Each
    mixture epoch reads data.samples_per_epoch samples (0: the sources' total) in proportion to the weights,
    interleaved; a source repeats or continues its own epochs, each sample once per source epoch
    (docs/data.md, Mixtures). Fixed for a run: a resume with other sources or weights is refused."""
    source_classes: Literal["same", "union"] = "same"
    """Mixtures: `same`: sources must share one class list (unless the task learns no labels); `union`: learn
    the union of their class names, each source's labels mapped onto it by name."""
    val_urls: Union[str, list[str]] = ""
    """Validation shards, same forms as train_urls ('' = none)."""
    mode: Literal["epochs", "resampled"] = "epochs"
    """`epochs`: each sample once per epoch; `resampled`: an endless stream of shards drawn with replacement."""
    samples_per_epoch: int = 0
    """Samples per epoch in resampled mode and for a mixture (0 = the shards' sample count, summed over the
    sources); with one source in `epochs` mode an epoch is the whole index."""
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
    decode: Literal["cpu", "gpu", "auto"] = "cpu"
    """Where training images are decoded, cropped and resized. `cpu`: in the data workers. `gpu`: the workers
    read each sample and draw its crop and flip (the same draws as `cpu`: same samples, crops and order), the
    trainer's process decodes the batch with nvJPEG and crops, resizes and flips on the GPU; non-JPEG samples
    and nvJPEG failures are decoded on the CPU. Refused on the CPU, and with data.auto_augment,
    data.color_jitter or data.reprob (no device form). `auto`: a provisional rule, not yet measured on a GPU
    (docs/data.md, Decoding on the GPU), resolved once at start and written in the run's config.yaml."""

    def check(self) -> None:
        require(not (self.sources and self.train_urls), "data.train_urls", self.train_urls,
                "must be empty when data.sources is set (a mixture lists each source's train_urls): give one of them")
        names = [src.name or f"source{i}" for i, src in enumerate(self.sources)]
        for i, src in enumerate(self.sources):
            require(bool(src.train_urls), f"data.sources[{i}].train_urls", src.train_urls, "must name shards")
            require(src.weight > 0, f"data.sources[{i}].weight", src.weight, "must be positive")
            require(names[i] not in names[:i], f"data.sources[{i}].name", names[i],
                    "is the name of an earlier source; give each source its own name")
        require(self.batch_size > 0, "data.batch_size", self.batch_size, "must be positive")
        require(self.workers >= 0, "data.workers", self.workers, "must be >= 0")
        require(self.shuffle_block > 0, "data.shuffle_block", self.shuffle_block, "must be positive")
        require(self.shuffle_mb >= 0, "data.shuffle_mb", self.shuffle_mb, "must be >= 0 (0 = no cap)")
        require(self.samples_per_epoch >= 0, "data.samples_per_epoch", self.samples_per_epoch, "must be >= 0")
        lo_hi = self.crop_scale
        require(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1.0, "data.crop_scale", lo_hi,
                "must be [lo, hi] with 0 < lo <= hi <= 1")
        require(0.0 <= self.hflip <= 1.0, "data.hflip", self.hflip, "must be in [0, 1]")
        require(0.0 <= self.reprob <= 1.0, "data.reprob", self.reprob, "must be in [0, 1]")
        require(self.color_jitter >= 0, "data.color_jitter", self.color_jitter, "must be >= 0")
        require(0.0 < self.eval_crop_pct <= 1.0, "data.eval_crop_pct", self.eval_crop_pct, "must be in (0, 1]")
        require(all(s > 0 for s in self.std), "data.std", self.std, "must hold positive values")
        require(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", self.max_bad_fraction,
                "must be in [0, 1]")
        host_only = self.host_only_augmentations()
        if self.decode == "gpu" and host_only:
            key, value, off = host_only[0]
            raise UserError(f"config key data.decode: got 'gpu', but {key}={value!r} has no device form (it runs on "
                            f"the CPU in the data workers): set {key}={off!r}, or decode on the CPU (data.decode=cpu)")

    def host_only_augmentations(self) -> list[tuple[str, Any, Any]]:
        """(key, value, its off value) of each augmentation set here that has no device form: RandAugment and
        colour jitter run on PIL images, random erasing in the workers."""
        knobs = [("data.auto_augment", self.auto_augment, ""), ("data.color_jitter", self.color_jitter, 0.0),
                 ("data.reprob", self.reprob, 0.0)]
        return [(key, value, off) for key, value, off in knobs if value]


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

    def check(self) -> None:
        require(self.epochs > 0 or self.max_steps > 0, "optim.epochs", self.epochs,
                "must be positive (or set optim.max_steps)")
        require(self.max_steps >= 0, "optim.max_steps", self.max_steps, "must be >= 0")
        require(self.lr_per_256 > 0, "optim.lr_per_256", self.lr_per_256, "must be positive")
        require(self.min_lr >= 0, "optim.min_lr", self.min_lr, "must be >= 0")
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, "must be >= 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas,
                "must be two values in [0, 1)")
        require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        require(self.accum_steps >= 1, "optim.accum_steps", self.accum_steps, "must be >= 1")
        require(self.max_nonfinite_steps >= 1, "optim.max_nonfinite_steps", self.max_nonfinite_steps, "must be >= 1")


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

    def check(self) -> None:
        require(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        require(not self.offload_optimizer or self.zero_stage >= 1, "deepspeed.offload_optimizer", True,
                "needs deepspeed.zero_stage >= 1")
        require(not self.offload_params or self.zero_stage == 3, "deepspeed.offload_params", True,
                "needs deepspeed.zero_stage == 3")
        require(self.bucket_size >= 0, "deepspeed.bucket_size", self.bucket_size,
                "must be >= 0 (0 = sized from the model)")


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Save every N optimizer steps (and always at the end and on SIGTERM/SIGUSR1)."""
    keep: int = 3
    """Checkpoints kept; older ones are deleted only after a newer one is complete."""
    resume: str = "auto"
    """`auto`: resume from the run directory's latest if any; `never`; or a checkpoint path."""

    def check(self) -> None:
        require(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps,
                "must be >= 0 (0 = only at the end)")
        require(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")
        require(self.resume != "", "checkpoint.resume", self.resume, "must be 'auto', 'never' or a checkpoint path")


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

    def check(self) -> None:
        require(self.every_steps >= 1, "logging.every_steps", self.every_steps, "must be >= 1")
        require(self.images_every_steps >= 0, "logging.images_every_steps", self.images_every_steps,
                "must be >= 0")


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


def validate(cfg: Config) -> None:
    """Every section's own rules, then those spanning sections; the first violation raises UserError
    naming its key. The model section's architecture is checked by `pretrain.models.check_model_config`."""
    for section in dataclasses.fields(cfg):
        getattr(cfg, section.name).check()
    m = cfg.model
    require(len(cfg.data.mean) == m.in_chans, "data.mean", cfg.data.mean,
            f"must have model.in_chans ({m.in_chans}) values")
    require(len(cfg.data.std) == m.in_chans, "data.std", cfg.data.std, f"must have model.in_chans ({m.in_chans}) values")
    require(m.compile is not True or cfg.deepspeed.zero_stage <= 2, "model.compile", True,
            "needs deepspeed.zero_stage <= 2 (ZeRO-3 gathers parameters in hooks inside each block)")
    kind = cfg.task.kind
    if kind in ("finetune", "linprobe"):
        require(bool(cfg.finetune.init_from), "finetune.init_from", cfg.finetune.init_from,
                f"must name an exported .safetensors file or a run directory for task.kind={kind}")
