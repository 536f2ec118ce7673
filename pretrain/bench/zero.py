"""`bench zero`: time per step and peak memory per rank for ZeRO 0/1/2/3 through our Trainer on 2
processes, against plain PyTorch DDP with the same model, batch and optimizer.

Each variant runs in its own `torchrun --nproc_per_node 2` job (a process group cannot be re-made
with another ZeRO layout in one process). Peak memory is CUDA's max_memory_allocated on a GPU and, on
the CPU, the growth of the resident set's high-water mark from just before the model is built.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = ["ddp", "zero0", "zero1", "zero2", "zero3"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("zero")
    g.add_argument("--zero-arch", default="vit_base_patch16_224")
    g.add_argument("--zero-img-size", type=int, default=32, help="small images: the step is dominated by "
                   "gradients, communication and the optimizer, which is what ZeRO changes")
    g.add_argument("--zero-batch", type=int, default=8)
    g.add_argument("--zero-steps", type=int, default=6)
    g.add_argument("--zero-variants", default=",".join(VARIANTS))


def worker(args) -> None:
    """One rank of one variant (run under torchrun)."""
    import torch.distributed as dist

    from pretrain import dist as pdist
    from pretrain.bench.step import bench_config, build_baseline, build_ours, synthetic_batch
    from pretrain.bench.timing import peak_bytes, reset_peak

    env = pdist.setup()
    device = pdist.rank_device(env.local_rank)
    images, labels = synthetic_batch(args.batch, args.img_size, 10, seed=env.rank)
    stage = 0 if args.variant == "ddp" else int(args.variant[-1])
    cfg = bench_config(args.arch, args.img_size, args.batch, stage, "supervised", args.out_dir)
    rss0 = reset_peak(device)
    if args.variant == "ddp":
        step = build_baseline(cfg, images, labels, 10, device, ddp=True)
    else:
        trainer = build_ours(cfg, images, labels, 10)
        step = lambda: trainer.train_steps(1)  # noqa: E731
    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.tensor([peak_bytes(device, rss0)], dtype=torch.float64)
    t = torch.tensor([sorted(times)[len(times) // 2]], dtype=torch.float64)
    peaks = [torch.zeros_like(peak) for _ in range(env.world_size)]
    dist.all_gather(peaks, peak)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if env.rank == 0:
        with open(args.result, "w") as f:
            json.dump({"variant": args.variant, "s_per_step": t.item(), "peak_bytes": [p.item() for p in peaks]}, f)
    pdist.teardown()


def run(args: argparse.Namespace) -> list[dict]:
    from pretrain.dist import free_port

    variants = [v for v in args.zero_variants.split(",") if v]
    results = {}
    steps = 3 if args.quick else args.zero_steps
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            result = f"{tmp}/{v}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), "-m", "pretrain.bench.zero", "--variant", v,
                   "--arch", args.zero_arch, "--img-size", str(args.zero_img_size), "--batch", str(args.zero_batch),
                   "--steps", str(steps), "--out-dir", f"{tmp}/{v}", "--result", result]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            env.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"zero bench variant {v} failed:\n{proc.stderr[-3000:]}")
            with open(result) as f:
                results[v] = json.load(f)
            print(f"   {v}: {results[v]['s_per_step']:.3f} s/step, peak "
                  f"{max(results[v]['peak_bytes']) / 2**20:.0f} MiB/rank", file=sys.stderr)
    base = results.get("ddp")
    setup = f"{args.zero_arch} img {args.zero_img_size} batch {args.zero_batch}/rank, 2 processes"
    rows = []
    for v, r in results.items():
        if v == "ddp":
            continue
        mem, base_mem = max(r["peak_bytes"]) / 2**20, (max(base["peak_bytes"]) / 2**20 if base else float("nan"))
        t, base_t = r["s_per_step"], (base["s_per_step"] if base else float("nan"))
        rows.append({"name": f"{v} time", "ours": t, "baseline": base_t, "unit": "s/step vs DDP",
                     "ratio": t / base_t, "goal": "report", "met": None, "setup": setup})
        rows.append({"name": f"{v} memory", "ours": mem, "baseline": base_mem, "unit": "peak MiB/rank vs DDP",
                     "ratio": mem / base_mem, "goal": "report", "met": None, "setup": setup})
    return rows

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    for name, typ in [("variant", str), ("arch", str), ("img-size", int), ("batch", int), ("steps", int),
                      ("out-dir", str), ("result", str)]:
        p.add_argument(f"--{name}", type=typ, required=True)
    worker(p.parse_args())
