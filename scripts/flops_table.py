"""Print the FLOPs-per-image table of docs/benchmarks.md for every registered architecture.

Training FLOPs are 3x forward (backward costs two forward passes). The images/s limit is the GPU's dense
bf16 peak (the MFU basis everywhere: pretrain.engine.metrics.PEAK_FLOPS) divided by training FLOPs per image:
what 100% MFU would give.
"""
import argparse

import torch

from pretrain.models import create_model, flops_per_image, list_models
from pretrain.models.mae import MaskedAutoencoder, mae_flops_per_image


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    args = ap.parse_args()
    print("| architecture | params (M) | fwd GFLOPs/img | train GFLOPs/img | img/s at 100% MFU | at 40% MFU |"
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
            mae_model = MaskedAutoencoder(create_model(name, num_classes=0))  # the paper's 8 x 512 decoder
        mae = 3 * mae_flops_per_image(mae_model)
        print(f"| `{name}` | {params:.1f} | {fwd / 1e9:.2f} | {train / 1e9:.1f} | {limit:,.0f} | {0.40 * limit:,.0f} |"
              f" {mae / 1e9:.1f} | {train / mae:.2f} |")


if __name__ == "__main__":
    main()
