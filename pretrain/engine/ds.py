"""DeepSpeed from our config: the JSON config (batch fields derived, `deepspeed.extra` merged last),
the optimizer (torch AdamW, fused on CUDA; DeepSpeed's own Adams by choice or for offload), and
`deepspeed.initialize`."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pretrain.config import deep_merge
from pretrain.errors import UserError


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32" | "bf16" | "fp16"
    autocast: torch.dtype | None  # bf16: torch.autocast around the forward
    input_dtype: torch.dtype  # dtype of the normalised images: the dtype DeepSpeed keeps the module in
    engine_bf16: bool = False  # bf16_mode=deepspeed: bf16 params and grads (reduced in bf16), fp32 master in
    # DeepSpeed's optimizer; otherwise (bf16_mode=autocast) params, grads and their reduction stay fp32


def resolve_precision(ds_cfg, device: torch.device) -> Precision:
    name = ds_cfg.precision
    if name == "auto":
        # V100 / T4 emulate bf16 (slower than fp32, and torch would still say "supported")
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        name = "bf16" if native else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("config key deepspeed.precision: got 'fp16', which needs a CUDA device; use bf16 or fp32")
    if name == "bf16" and ds_cfg.bf16_mode == "deepspeed":
        # autocast kept on: layer norms, softmax and losses still run in fp32 on the bf16 weights
        return Precision("bf16", torch.bfloat16, torch.bfloat16, engine_bf16=True)
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, torch.float32)
    if name == "fp16":
        return Precision("fp16", None, torch.float16)
    return Precision("fp32", None, torch.float32)


def autocast(precision: Precision, device: torch.device):
    """The forward's context: torch.autocast to bf16 when `precision` computes under autocast, else none."""
    if precision.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.autocast)


def bucket_elements(configured: int, num_params: int, hidden: int) -> int:
    """`deepspeed.bucket_size`, or when 0 a size fitted to the model: a quarter of its parameters
    (about four reductions overlapping the backward), at least hidden^2 (DeepSpeed's own rule of thumb),
    at most 5e7, rounded up to a multiple of 1024. A fixed 5e7 makes a ViT-S (22M parameters) allocate a 200 MB buffer per bucket."""
    if configured:
        return configured
    size = int(min(5e7, max(hidden * hidden, num_params // 4)))
    return -(-size // 1024) * 1024  # DeepSpeed asserts alignment (its nccl_start_alignment_factor)


def build_ds_config(cfg, world_size: int, precision: Precision, *, load_universal: bool = False,
                    num_params: int = 0, hidden: int = 768) -> dict:
    """The DeepSpeed JSON config. Batch fields are derived (micro x accum x world), never typed twice."""
    z, o, d = cfg.deepspeed, cfg.optim, cfg.data
    bucket = bucket_elements(z.bucket_size, num_params or 4 * 50_000_000, hidden)
    zero: dict = {"stage": z.zero_stage, "overlap_comm": z.overlap_comm, "reduce_bucket_size": bucket,
                  "allgather_bucket_size": bucket, "contiguous_gradients": True}
    if z.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=bucket, stage3_param_persistence_threshold=10 * hidden,
                    stage3_gather_16bit_weights_on_model_save=False)
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out = {
        "train_micro_batch_size_per_gpu": d.batch_size,
        "gradient_accumulation_steps": o.accum_steps,
        "train_batch_size": d.batch_size * o.accum_steps * world_size,
        "gradient_clipping": 0.0 if clips_in_optimizer(cfg, precision) else o.grad_clip,
        "zero_optimization": zero,
        # bf16 autocast mode: fp32 module under torch.autocast, so DeepSpeed sees fp32; bf16 deepspeed
        # mode: DeepSpeed holds the module in bf16 and an fp32 master copy in its optimizer
        "bf16": {"enabled": precision.engine_bf16},
        # DeepSpeed's forward turns off an autocast entered outside it unless this section enables one: without
        # it the bf16 modes ran in fp32 inside the engine (6x slower on an H100). No module is listed as safe
        # for lower precision, so gradients are still reduced in their own dtype.
        "torch_autocast": {"enabled": precision.autocast is not None, "dtype": "bf16",
                           "lower_precision_safe_modules": []},
        "fp16": {"enabled": precision.name == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device twice per micro-step (on by default)
        "timers": {"throughput": {"enabled": False}},
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": load_universal},
    }
    return deep_merge(out, z.extra)


def clips_in_optimizer(cfg, precision: Precision) -> bool:
    """Whether our `guarded` optimizer clips the gradients instead of DeepSpeed: at ZeRO 0 with fp32 parameters
    DeepSpeed's own clip builds its threshold with `torch.tensor([max_norm], device=...)` every step, a
    host-to-device copy that synchronises the GPU (its bf16 and fp16 optimizers and ZeRO clip on their own)."""
    return cfg.deepspeed.zero_stage == 0 and not precision.engine_bf16 and precision.name != "fp16"


def guarded(optimizer_cls):
    """`optimizer_cls` that skips a step whose gradients are not finite, on the device, and clips to `clip`.

    DeepSpeed's ZeRO optimizers already skip such steps (a host read of the norm each step); at stage 0
    DeepSpeed calls the bare optimizer. torch's fused AdamW honours `found_inf` as GradScaler sets it: a
    non-zero value leaves parameters, moments and the step count as they were, so the decision never leaves
    the device. `found_inf` (1.0 skipped, 0.0 applied) stays readable for the trainer's count. An optimizer
    without that argument (DeepSpeed's FusedAdam) reads the flag on the host and says so in `.overflow`.
    """

    class Guarded(optimizer_cls):
        overflow = False
        clip = 0.0  # max global gradient norm (0: off)

        def step(self, closure=None):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if not grads:
                return super().step(closure)
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # pre-clip, DeepSpeed logs it
            self._global_grad_norm = norm
            self.found_inf = (~torch.isfinite(norm)).float()
            if self.clip:  # a non-finite norm makes the grads NaN here: found_inf drops the step anyway
                torch._foreach_mul_(grads, torch.clamp(self.clip / (norm + 1e-6), max=1.0))
            if not self.defaults.get("fused"):
                self.overflow = bool(self.found_inf)  # one host read per step
                if self.overflow:
                    return None
            return super().step(closure)

    Guarded.__name__ = f"Guarded{optimizer_cls.__name__}"
    return Guarded


def build_optimizer(cfg, param_groups: list[dict], device: torch.device, *, clip: float = 0.0,
                    guard: bool = True):
    """AdamW. By default torch's fused kernel (CUDA; the CPU too at stage 0, where it skips a non-finite
    step on the device: `guarded`); `optim.impl=deepspeed` picks DeepSpeed's FusedAdam (JIT-built with nvcc
    at first use). With the optimizer offloaded, DeepSpeed requires its CPU Adam (also JIT-built).
    `clip`: the global norm the stage-0 optimizer clips to (`clips_in_optimizer`). `guard=False` leaves out
    the ZeRO-0 non-finite guard (the engine's, not the optimizer's): the benchmarks' plain loops."""
    o = cfg.optim
    kwargs = dict(lr=0.0, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=1e-8)
    stage0 = cfg.deepspeed.zero_stage == 0
    if device.type == "cuda" and cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, adamw_mode=True, **kwargs)
    if device.type == "cuda" and o.impl == "deepspeed":
        from deepspeed.ops.adam import FusedAdam

        cls, kwargs = FusedAdam, dict(kwargs, adam_w_mode=True)
    else:  # fused on the CPU too at stage 0 (the kernel the guard's device-side skip needs; a plain loop alike)
        cls, kwargs = torch.optim.AdamW, dict(kwargs, fused=device.type == "cuda" or stage0)
    if not (stage0 and guard):
        return cls(param_groups, **kwargs)
    opt = guarded(cls)(param_groups, **kwargs)
    opt.clip = clip
    return opt


def _skip_shm_comm_build() -> None:
    """DeepSpeed's comm layer compiles its shared-memory all-reduce op with g++ the first time in every
    environment (~25 s on 2 idle cores; again whenever the install path changes) for `inference_all_reduce`
    alone, which training never calls: marked unavailable, the comm layer skips it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def initialize(task: torch.nn.Module, cfg, world_size: int, device: torch.device, precision: Precision,
               *, load_universal: bool = False, compile: bool = False):
    """-> (engine, ds_config). The engine wraps the Task; its module state dict holds `encoder.*`. `compile`:
    model.compile as resolved for the device (engine/kernels.py `resolve_compile`)."""
    import deepspeed

    _skip_shm_comm_build()

    task.to(device)
    if cfg.deepspeed.zero_stage == 3:
        # parameters a Task reads outside their module's forward (MAE reads the encoder's tokens and
        # position embeddings directly) must be gathered with the Task's own forward
        for param in getattr(task, "external_params", lambda: [])():
            deepspeed.zero.register_external_parameter(task, param)
    groups = task.param_groups(cfg)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    optimizer = build_optimizer(cfg, groups, device,
                                clip=cfg.optim.grad_clip if clips_in_optimizer(cfg, precision) else 0.0)
    ds_config = build_ds_config(cfg, world_size, precision, load_universal=load_universal,
                                num_params=sum(p.numel() for p in task.parameters()),
                                hidden=task.encoder.embed_dim)
    if compile:
        compile_blocks(task)
    engine, *_ = deepspeed.initialize(model=task, optimizer=optimizer, config=ds_config)
    if world_size == 1 and cfg.deepspeed.zero_stage == 0:
        # one rank: DeepSpeed would still flatten every gradient into a bucket, all-reduce it with itself and
        # copy it back, three passes over the gradients each step for nothing (ZeRO 1-3 reduce in their own
        # optimizers; bf16's optimizer still folds its gradients in before this point)
        engine.enable_backward_allreduce = False
    return engine, ds_config


def compile_blocks(task: torch.nn.Module, **options) -> list[str]:
    """torch.compile each transformer block in place (as DINOv3 does) -> the compiled blocks' names.

    Per block rather than the whole Task: what lies between blocks (MAE's CPU-generated mask noise, the
    EMA update with its per-step Python int, DeepSpeed's hooks) stays eager instead of breaking graphs or
    recompiling, every block of one shape shares one graph, and parameter names do not change (checkpoints
    and export are unaffected). The EMA copy is never trained, so it is left alone. `options`: torch.compile's
    (tests pass a cheap backend).
    """
    names = []
    for name, module in task.named_modules():
        if name.rsplit(".", 1)[-1] in ("blocks", "decoder_blocks") and not name.startswith("ema."):
            for i, blk in enumerate(module):
                blk.compile(**options)
                names.append(f"{name}.{i}")
    return names
