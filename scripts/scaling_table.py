"""Per-step communication vs compute for data-parallel ViT training with DeepSpeed ZeRO, on paper.

Prints the tables of docs/scaling.md. Re-run with a measured GPU rate (`--tflops` x `--mfu`) and
network figures once they are known: every input is an option and every output follows from them.

Model (per optimizer step, per GPU; D = nodes x GPUs per node data-parallel ranks, S = parameters x bytes):
- ring reduce-scatter or all-gather of S moves (D-1)/D x S per rank; an all-reduce is both, 2(D-1)/D x S.
  In a ring laid out node by node every node sends that same volume over its network link, so across
  nodes the time is volume / (per-node bandwidth); inside one node it is volume / NVLink bus bandwidth.
  Each call also pays (D-1) ring steps of `--alpha-us` latency.
- ZeRO-1 (DeepSpeed 0.19.8 stage_1_and_2.py): gradients reduce-scattered once per optimizer step (at the
  accumulation boundary), updated parameters all-gathered once. ZeRO-2: the same, but gradients are
  reduce-scattered at every micro-step. ZeRO-3: parameters all-gathered in every micro-step's forward
  and again in its backward, gradients reduce-scattered every micro-step.
- Without overlap_comm every collective adds to the compute time. With it (ideal overlap): gradient
  reduction hides under the backward (2/3 of compute) except its last bucket; ZeRO-3's gathers hide
  under forward/backward except the first bucket; ZeRO-1/2's parameter all-gather after the optimizer
  step never overlaps.
- Compute: training FLOPs per image (3 x forward; pretrain.models.flops_per_image / mae_flops_per_image)
  x images per GPU per step / (peak x MFU).
"""
import argparse
import math

import torch

from pretrain.engine.ds import bucket_elements
from pretrain.models import create_model, flops_per_image
from pretrain.models.mae import MaskedAutoencoder, mae_flops_per_image

# (architecture, micro-batch per GPU, accumulation steps): the MAE recipes' per-GPU work
MODELS = [("vit_base_patch16_224", 128, 1), ("vit_large_patch16_224", 64, 2), ("vit_huge_patch14_224", 32, 4)]
NODES = [1, 2, 4, 8, 16, 32, 64]


def model_figures(arch: str, task: str) -> tuple[int, float, int, int]:
    """(parameters that get gradients, training FLOPs per image, blocks, hidden size)."""
    with torch.device("meta"):
        vit = create_model(arch, num_classes=0 if task == "mae" else 1000)
        model = MaskedAutoencoder(vit) if task == "mae" else vit
    fwd = mae_flops_per_image(model) if task == "mae" else flops_per_image(model)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return params, 3 * fwd, len(vit.blocks), vit.embed_dim


def collective_s(volume_b: float, calls: int, ranks: int, busbw: float, alpha: float) -> float:
    """Seconds for `calls` ring collectives moving `volume_b` bytes per rank in all."""
    return volume_b / busbw + calls * (ranks - 1) * alpha


def step_times(a, params: int, flops_img: float, blocks: int, micro: int, accum: int, nodes: int,
               bucket: int) -> dict:
    """Seconds per optimizer step: compute, and (no overlap, overlap) per ZeRO stage."""
    d = nodes * a.gpus_per_node
    busbw = a.nvlink_gbs * 1e9 if nodes == 1 else a.node_gbps / 8 * 1e9
    alpha = a.alpha_us * 1e-6
    comp = micro * accum * flops_img / (a.tflops * 1e12 * a.mfu)
    fwd, bwd = comp / 3, 2 * comp / 3
    share = (d - 1) / d
    size = params * a.bytes
    calls = math.ceil(params / bucket)
    one = collective_s(share * size, calls, d, busbw, alpha)  # one reduce-scatter or all-gather of S
    tail = collective_s(share * min(bucket, params) * a.bytes, 1, d, busbw, alpha)  # its last bucket
    z3_calls = max(calls, blocks)  # ZeRO-3 gathers at least once per block
    z3_one = collective_s(share * size, z3_calls, d, busbw, alpha)
    out = {"compute": comp}
    for stage, reductions in ((1, 1), (2, accum)):  # each hides under one micro-step's backward
        out[stage] = (comp + reductions * one + one, comp + reductions * max(one - bwd / accum, tail) + one)
    ag3, rs3 = 2 * accum * z3_one, accum * one
    exposed = accum * (max(z3_one - fwd / accum, tail) + max(z3_one + one - bwd / accum, tail))
    out[3] = (comp + ag3 + rs3, comp + exposed)
    out["volume"] = {1: 2 * share * size, 2: (accum + 1) * share * size, 3: 3 * accum * share * size}
    return out


def best_bucket(a, params: int, nodes: int) -> int:
    """Bucket (elements) minimising latency x calls + the exposed last bucket: sqrt(P x B x L / bytes)."""
    d = nodes * a.gpus_per_node
    busbw = a.nvlink_gbs * 1e9 if nodes == 1 else a.node_gbps / 8 * 1e9
    latency = (d - 1) * a.alpha_us * 1e-6
    return int(math.sqrt(params * busbw * latency / a.bytes))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tflops", type=float, default=989.0, help="GPU peak dense bf16 TFLOP/s (H100 SXM: 989)")
    ap.add_argument("--mfu", type=float, default=0.40, help="ASSUMED fraction of peak reached (not measured yet)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--node-gbps", type=float, default=400.0, help="network bandwidth per node, Gbit/s")
    ap.add_argument("--nvlink-gbs", type=float, default=360.0, help="ASSUMED NCCL bus bandwidth in a node, GB/s")
    ap.add_argument("--alpha-us", type=float, default=5.0, help="ASSUMED latency per ring step, microseconds")
    ap.add_argument("--bytes", type=int, default=4,
                    help="bytes per communicated element: 4 = fp32 gradients/params (bf16 autocast), 2 = bf16")
    ap.add_argument("--task", choices=["mae", "supervised"], default="mae")
    ap.add_argument("--global-batch", type=int, default=0,
                    help="hold the global batch fixed (strong scaling); 0 = fixed work per GPU (weak scaling)")
    ap.add_argument("--bucket", type=float, default=0,
                    help="reduce/all-gather bucket, elements; 0 = the trainer's rule (deepspeed.bucket_size: 0)")
    args = ap.parse_args()

    rate = args.tflops * args.mfu
    print(f"GPU rate {rate:.0f} TFLOP/s ({args.mfu:.0%} of {args.tflops:.0f}), {args.node_gbps:.0f} Gb/s per node, "
          f"{args.gpus_per_node} GPUs/node, {args.bytes}-byte elements, task {args.task}, "
          f"{'global batch ' + str(args.global_batch) if args.global_batch else 'fixed work per GPU'}\n")
    for arch, micro, accum in MODELS:
        params, flops_img, blocks, hidden = model_figures(arch, args.task)
        bucket = bucket_elements(int(args.bucket), params, hidden)
        print(f"### {arch} ({params / 1e6:.0f}M parameters with gradients, {flops_img / 1e9:.1f} GFLOPs per "
              f"training image, bucket {bucket / 1e6:.0f}M elements)\n")
        print("| nodes | GPUs | img/GPU/step | compute ms | ZeRO-1 MB | ZeRO-1 ms (eff) no overlap / overlap |"
              " ZeRO-2 MB | ZeRO-2 ms (eff) no overlap / overlap | ZeRO-3 MB | ZeRO-3 ms (eff) no overlap / overlap |"
              " best bucket |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for nodes in NODES:
            d = nodes * args.gpus_per_node
            m, k = micro, accum
            if args.global_batch:
                per_gpu = max(1, args.global_batch // d)
                k = math.ceil(per_gpu / micro)
                m = per_gpu // k
            t = step_times(args, params, flops_img, blocks, m, k, nodes, bucket)
            cells = []
            for stage in (1, 2, 3):
                # scaling efficiency: per-GPU throughput vs an ideal GPU that only computes
                eff = [t["compute"] / s for s in t[stage]]
                cells += [f"{t['volume'][stage] / 1e6:,.0f}",
                          f"{t[stage][0] * 1e3:,.0f} ({eff[0]:.0%}) / {t[stage][1] * 1e3:,.0f} ({eff[1]:.0%})"]
            print(f"| {nodes} | {d} | {m}x{k} | {t['compute'] * 1e3:,.0f} | " + " | ".join(cells) +
                  f" | {best_bucket(args, params, nodes) / 1e6:.0f}M |")
        print()


if __name__ == "__main__":
    main()
