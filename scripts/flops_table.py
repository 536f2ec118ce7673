"""Print the FLOPs-per-image table of docs/benchmarks.md for every registered architecture.

Training FLOPs are 3x forward (backward costs two forward passes). The images/s limit is the peak
bf16 matrix rate divided by training FLOPs per image: what 100% MFU would give.
"""
import argparse

import torch

from pretrain.models import block_flops, create_model, flops_per_image, list_models


def mae_flops(model, mask_ratio=0.75, dec_dim=512, dec_depth=8) -> float:
    """Forward FLOPs of MAE: patch embed on all patches, encoder on visible ones, decoder on all."""
    n = model.patch_embed.num_patches
    visible = int(n * (1 - mask_ratio))
    enc = flops_per_image(model, tokens=visible + 1)
    enc += 2 * (n - visible) * model.embed_dim * model.patch_embed.proj.weight[0].numel()  # embeds masked too
    pix = model.patch_embed.proj.weight[0].numel()
    dec = 2 * (visible + 1) * model.embed_dim * dec_dim + dec_depth * block_flops(n + 1, dec_dim, 4 * dec_dim)
    dec += 2 * (n + 1) * dec_dim * pix
    return enc + dec


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 matrix peak (H100/H200 measured)")
    args = ap.parse_args()
    print("| architecture | params (M) | fwd GFLOPs/img | train GFLOPs/img | img/s at 100% MFU | at 45% MFU |"
          " MAE train GFLOPs/img | sup/MAE FLOP ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in list_models():
        with torch.device("meta"):
            model = create_model(name, num_classes=1000)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        fwd = flops_per_image(model)
        train = 3 * fwd
        limit = args.peak_tflops * 1e12 / train
        with torch.device("meta"):
            enc = create_model(name, num_classes=0)
        mae = 3 * mae_flops(enc)
        print(f"| `{name}` | {params:.1f} | {fwd / 1e9:.2f} | {train / 1e9:.1f} | {limit:,.0f} | {0.45 * limit:,.0f} |"
              f" {mae / 1e9:.1f} | {train / mae:.2f} |")


if __name__ == "__main__":
    main()
