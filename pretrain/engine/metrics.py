"""Rank-0 logging: a progress bar, `metrics.jsonl` (one object per logging step) and TensorBoard.

Other ranks get a logger that does nothing, so the loop calls it unconditionally.
"""
from __future__ import annotations

import json
import math
import sys
import time

import fsspec
import torch

# dense bf16/fp16 peak FLOP/s of common accelerators, for the MFU estimate (None where unknown: CPU)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


class MetricsLogger:
    def __init__(self, run_dir: str, *, enabled: bool, tensorboard: bool, progress: bool, total_steps: int,
                 start_step: int):
        self.enabled = enabled
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

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
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

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
