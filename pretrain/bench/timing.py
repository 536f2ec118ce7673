"""Interleaved timing: ours and the baseline alternate in the same process, so drift, thermal state and
other load hit both alike; medians over rounds resist the odd slow round. Also the device, its name, the
peak-memory measures and the comma-list flags the benchmarks share."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(contenders: dict[str, Callable[[], None]], rounds: int, warmup: int = 1,
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Call each contender `warmup` times, then `rounds` times in alternating order; seconds per call."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
            sync()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]  # ABBA: neither always goes first
        for name in order:
            sync()
            t0 = time.perf_counter()
            contenders[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def comma_list(text: str) -> list[str]:
    """A flag's comma-separated values, blanks dropped: "a, b," -> ["a", "b"]."""
    return [v.strip() for v in text.split(",") if v.strip()]


def device_name(device) -> str:
    """What the results call the device: the GPU's full name (its MFU peak is matched on it), else "cpu"."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def bench_device():
    """The device benchmarks run on (CUDA when there is one), DeepSpeed told the same through $DS_ACCELERATOR
    before it is imported."""
    import os

    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_sync(device) -> Callable[[], None]:
    """What waits for `device`'s queued work before a clock is read (nothing to wait for on the CPU)."""
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def reset_peak(device) -> int:
    """Start a peak-memory measurement -> the resident set now (the CPU's baseline for `peak_bytes`)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return rss_bytes()


def rss_bytes() -> int:
    """This process's resident set now."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(device, rss0: int) -> int:
    """Peak memory since `reset_peak`: CUDA's max_memory_allocated on a GPU; on the CPU the growth of the
    resident set's high-water mark over `rss0` (its value then)."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
