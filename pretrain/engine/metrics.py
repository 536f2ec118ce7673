"""Rank-0 logging: lines for a person on stderr (`Console`), a progress bar, `metrics.jsonl` (one object per
logging step) and TensorBoard (`MetricsLogger`), and the sums they average (`Window`).

Other ranks get a console and a logger that do nothing, so the engine calls them unconditionally.
"""
from __future__ import annotations

import json
import math
import sys
import time

import fsspec
import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peak FLOP/s by device name: the one MFU basis everywhere (metrics.jsonl,
# `bench gpu`, scripts/flops_table.py, the docs). Matched as substrings of torch.cuda.get_device_name, most specific
# first, so PCIe and NVL parts never take the SXM figure ("NVIDIA H100 80GB HBM3" is the SXM part). Hopper figures:
# NVIDIA's H100 and H200 datasheets list bf16 with sparsity, halved here: H100/H200 SXM 1,979 -> 989; H100 PCIe
# 1,513 -> 756; H100 NVL and H200 NVL 1,671 -> 835. None where unknown (the CPU, an unlisted GPU).
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
              ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12), ("V100", 125e12),
              ("RTX 4090", 165e12), ("RTX 3090", 71e12))


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of `device` (PEAK_FLOPS), None off CUDA or for a GPU not listed."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    return next((value for key, value in PEAK_FLOPS if key in name), None)


class Console:
    """The engine's one way to tell a person something: a line on stderr from rank 0 (other ranks say nothing),
    written above the progress bar while one shows."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None  # set by MetricsLogger while its progress bar shows

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        self.info(f"vit-pretrain: warning: {msg}")


class MetricsLogger:
    def __init__(self, run_dir: str, console: Console, *, tensorboard: bool, progress: bool, total_steps: int,
                 start_step: int):
        self.enabled = enabled = console.enabled
        self.console = console
        self.run_dir = run_dir
        self.tb = None
        self.bar = None
        self.jsonl = None
        if not enabled:
            return
        self.jsonl = fsspec.open(f"{run_dir}/metrics.jsonl", "a").open()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=f"{run_dir}/tb", purge_step=start_step + 1 if start_step else None)
        if progress:
            from tqdm import tqdm

            self.bar = console.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                                          file=sys.stderr, mininterval=1.0)

    def log(self, step: int, values: dict) -> None:
        """One logging step: values are plain floats/ints (already read from the device)."""
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        # non-finite values (a window of skipped steps) are written as null: strict JSON
        row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()})
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", lr=f"{values.get('lr', 0):.2e}",
                                 img_s=f"{values.get('images_per_sec', 0):.0f}", refresh=False)

    def scalars(self, step: int, prefix: str, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **{f"{prefix}/{k}": v for k, v in values.items()}}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """grid: (3, H, W) floats in [0, 1]."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, grid, step)

    def text(self, tag: str, text: str) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, 0)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = self.console.bar = None
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


class Window:
    """Sums of per-step metrics between two logging steps, kept on the device until read."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counted: torch.Tensor | float = 0.0  # applied steps (on the device once a step is added)
        self.steps = 0
        self.data_wait = 0.0  # seconds waited for batches
        self.t0 = time.perf_counter()

    def add(self, metrics: dict, skipped: torch.Tensor) -> None:
        """One step's metrics; `skipped` (0-dim, on the device) 1.0 leaves them out, without a host read."""
        for k, v in metrics.items():
            v = torch.where(skipped > 0, 0.0, v.detach().float())
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.counted = self.counted + (1 - skipped)
        self.steps += 1

    def read(self, world_size: int, extra: torch.Tensor | None = None) -> tuple[dict, list[float]]:
        """-> (window means averaged over ranks, `extra` as floats): the window's one host read. The means
        are a collective (every rank calls it at the same step); a window of skipped steps only gives NaN."""
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).div(self.counted) if keys else torch.zeros(0)
        if world_size > 1 and keys:
            import torch.distributed as dist

            dist.all_reduce(values)
            values = values / world_size
        n = len(keys)
        if extra is not None:
            values = torch.cat([values.to(extra.device), extra.to(values.dtype)])
        read = values.tolist()
        return dict(zip(keys, read[:n])), read[n:]
