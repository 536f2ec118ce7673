"""Per-rank memory on paper at ZeRO 0-3 on N ranks: the model states (parameters, gradients, optimizer
states) from the parameter count and the bytes each takes in the engine's mixed-precision layout, plus
activations per sample fitted to measured ZeRO-0 points (`bench memory`).

Layouts, bytes per parameter (`deepspeed.bf16_mode`; engine/ds.py `resolve_precision`, `build_ds_config`):

- `autocast`, the default: DeepSpeed holds the module in fp32 and the forward runs under torch.autocast, so
  parameters (4) and gradients (4) are fp32 and AdamW keeps two fp32 moments (8). At ZeRO 0 DeepSpeed calls
  torch's AdamW on the module's own parameters: 16 in all. ZeRO 1/2's optimizer clones its partition of the
  parameters as an fp32 master (4/N) although the module is fp32 already, and steps on a flattened fp32
  copy of its gradient partition (4/N); ZeRO 3 steps the fp32 partition itself (no master copy).
- `deepspeed` (bf16_mode=deepspeed; the layout DeepSpeed's estimators assume): bf16 parameters (2) and
  gradients (2), an fp32 master (4), an fp32 gradient partition (4) and fp32 moments (8). At ZeRO 0
  DeepSpeed wraps AdamW in its FP16_UnfusedOptimizer: the same states, none partitioned.

Stage s partitions over N ranks: 1 the optimizer's states (master, fp32 gradients, moments), 2 also the
gradients, 3 also the parameters; ZeRO 3 also holds the largest layer gathered at full size (its parameters
and gradients: DeepSpeed's `largest_layer_memory` term). Left out: communication buckets, ZeRO-3's
prefetch and persistent small parameters, the allocator's fragmentation. The fp32 gradient partition lives
only during the optimizer step, when the activations are freed, so adding it to the activations' peak
overstates that peak by up to 4P/N bytes: the model errs on the safe side.
"""
from __future__ import annotations

from dataclasses import dataclass

STATES = ("params", "grads", "master", "grads_fp32", "moments")
PARTITIONED_FROM = {"params": 3, "grads": 2, "master": 1, "grads_fp32": 1, "moments": 1}
"""state -> the first ZeRO stage that partitions it over the ranks."""
_AUTOCAST_ZERO = dict(params=4, grads=4, master=4, grads_fp32=4, moments=8)
LAYOUTS = {
    "autocast": {0: dict(params=4, grads=4, master=0, grads_fp32=0, moments=8), 1: _AUTOCAST_ZERO,
                 2: _AUTOCAST_ZERO, 3: dict(_AUTOCAST_ZERO, master=0)},
    "deepspeed": {s: dict(params=2, grads=2, master=4, grads_fp32=4, moments=8) for s in range(4)},
}
"""layout -> ZeRO stage -> state -> bytes per parameter (the module docstring says where each comes from)."""


@dataclass(frozen=True)
class ActivationFit:
    """Peak memory at ZeRO 0 on one rank = static_bytes + bytes_per_sample x micro-batch."""
    static_bytes: float
    bytes_per_sample: float


def model_states(params: int, stage: int, ranks: int, layout: str = "autocast",
                 largest_layer: int = 0) -> dict[str, float]:
    """Bytes per rank of each model state at ZeRO `stage` on `ranks` ranks (+ `gathered` at ZeRO 3)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    per_param = LAYOUTS[layout][stage]
    out = {s: per_param[s] * params / (ranks if stage >= PARTITIONED_FROM[s] else 1) for s in STATES}
    if stage == 3:
        out["gathered"] = float((per_param["params"] + per_param["grads"]) * largest_layer)
    return out


def model_state_bytes(params: int, stage: int, ranks: int, layout: str = "autocast", largest_layer: int = 0) -> float:
    return sum(model_states(params, stage, ranks, layout, largest_layer).values())


def fit_activations(points: list[tuple[int, float]], params: int, layout: str = "autocast") -> ActivationFit:
    """Least squares over measured ZeRO-0 (micro-batch, peak bytes) points. One point: the static part is the
    paper's ZeRO-0 model states (autocast's bf16 weight copies and workspaces then count as activations)."""
    if not points:
        raise ValueError("fit_activations needs at least one measured (batch, peak) point")
    if len({b for b, _ in points}) == 1:
        static = model_state_bytes(params, 0, 1, layout)
        b, peak = points[0]
        return ActivationFit(static, (peak - static) / b)
    n = len(points)
    mb, mp = sum(b for b, _ in points) / n, sum(p for _, p in points) / n
    slope = sum((b - mb) * (p - mp) for b, p in points) / sum((b - mb) ** 2 for b, _ in points)
    return ActivationFit(mp - slope * mb, slope)


def per_rank_bytes(params: int, stage: int, ranks: int, batch: int, fit: ActivationFit, layout: str = "autocast",
                   largest_layer: int = 0) -> float:
    """Peak bytes per rank on paper: model states at (stage, ranks), what the ZeRO-0 fit holds beyond its own
    model states (autocast's weight copies, workspaces: assumed the same at every stage), and activations."""
    other = fit.static_bytes - model_state_bytes(params, 0, 1, layout)
    return model_state_bytes(params, stage, ranks, layout, largest_layer) + other + fit.bytes_per_sample * batch


def largest_batch(capacity: float, params: int, stage: int, ranks: int, fit: ActivationFit,
                  layout: str = "autocast", largest_layer: int = 0) -> int:
    """The largest micro-batch whose paper peak fits in `capacity` bytes (0: none)."""
    free = capacity - per_rank_bytes(params, stage, ranks, 0, fit, layout, largest_layer)
    return max(0, int(free // fit.bytes_per_sample)) if fit.bytes_per_sample > 0 else 0


def deepspeed_estimate(params: int, stage: int, ranks: int, largest_layer: int = 0) -> int:
    """DeepSpeed's own per-GPU estimate of the model states, without offload (ZeRO 2 and 3 only).

    Its ZeRO-2 figure, 2P + 18P/N (bf16 parameters; bf16 and fp32 gradients, fp32 master and moments
    partitioned), is our `deepspeed` layout exactly. Its ZeRO-3 figure, 4L + 18P/N, reuses the stage-2 list of
    partitioned states and so leaves out the bf16 parameter partition that stage 3 adds: ours is 2P/N more.
    Our default `autocast` layout holds fp32 parameters and gradients, so it differs from both by design (at
    ZeRO 2: 4P + 20P/N). `estimate_zero{2,3}_model_states_mem_needs_all_cold` print these same figures.
    """
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=ranks, cpu_offload=False)[1]
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(params, largest_layer, num_gpus_per_node=ranks,
                                                     cpu_offload=False, cpu_offload_params=False)[1]
    raise ValueError(f"DeepSpeed estimates model states at ZeRO 2 and 3 only, not {stage}")


def count_params(arch: str, kind: str, overrides=()) -> tuple[int, int]:
    """(parameters, the largest layer's own parameters) of the Task the trainer builds for `arch` and `kind`
    (supervised with 1000 classes, or MAE with our decoder), built on the meta device: nothing allocated."""
    import tempfile

    import torch

    from pretrain.bench.step import bench_config
    from pretrain.tasks import build_task

    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(arch, _img_size(arch), 1, 0, kind, tmp, ["model.num_classes=1000", *overrides])
    with torch.device("meta"):
        task = build_task(cfg, cfg.model.num_classes)
    total = sum(p.numel() for p in task.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in task.modules())
    return total, largest


def _img_size(arch: str) -> int:
    from pretrain.models.archs import registered

    return registered(arch)["img_size"]


def paper_table(archs, kinds=("supervised", "mae"), ranks=(8, 64), layout: str = "autocast") -> list[dict]:
    """Model-state bytes per rank at ZeRO 0-3 for each arch, kind and rank count (no activations)."""
    rows = []
    for arch in archs:
        for kind in kinds:
            params, largest = count_params(arch, kind)
            for n in ranks:
                rows.append({"arch": arch, "kind": kind, "ranks": n, "params": params, "layout": layout,
                             "bytes": [model_state_bytes(params, s, n, layout, largest) for s in range(4)]})
    return rows
