"""`vit-pretrain export RUN_DIR`: a DeepSpeed checkpoint (any ZeRO stage, any world size) -> one
safetensors file with timm's key names + a JSON naming the timm architecture and its arguments.

After writing, the file is read back into a fresh `timm.create_model(name, pretrained=False, **kwargs)`
with `strict=True`, and its logits (features for MAE) on a fixed input must match the trained model's;
a mismatch is an error. `--format hf` also writes a Hugging Face transformers directory.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import fsspec
import torch

from pretrain.engine.consolidate import consolidate, export_state, run_meta
from pretrain.errors import UserError, first_line
from pretrain.weights import build_timm, fixed_input, load_exported, meta_path, save_exported


class ExportMismatch(RuntimeError):
    """The exported file does not reproduce the trained model's outputs (a bug, not a user error)."""


# ----------------------------------------------------------------------------- the check


def reference_model(run_dir: str, state: dict[str, torch.Tensor], num_classes: int):
    """The trained model as the trainer built it (pretrain.models.create_model from model.json), loaded
    with the checkpoint's encoder weights."""
    from pretrain.models import create_model

    rm = run_meta(run_dir)
    kwargs = dict(rm["kwargs"], num_classes=num_classes)
    model = create_model(rm["name"], **kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def check_outputs(reference: torch.nn.Module, exported: torch.nn.Module, x: torch.Tensor, atol: float = 1e-5) -> float:
    """Max |difference| of the two models' outputs on `x`; raises ExportMismatch above `atol`."""
    a, b = reference(x).float(), exported(x).float()
    if a.shape != b.shape:
        raise ExportMismatch(f"exported model output shape {tuple(b.shape)} != trained model's {tuple(a.shape)}")
    diff = (a - b).abs().max().item()
    scale = max(a.abs().max().item(), 1.0)
    if not diff <= atol * scale:
        raise ExportMismatch(f"exported model outputs differ from the trained model's by {diff:.3g} "
                             f"(tolerance {atol * scale:.3g})")
    return diff


def export(run_dir: str, out: str | None = None, tag: str | None = None, fmt: str = "safetensors",
           ema: bool = False) -> dict[str, Any]:
    """Write `out` (+ .json), read it back into plain timm with strict=True and check its outputs."""
    state, meta = export_state(run_dir, tag)
    if ema:
        module_state, _ = consolidate(run_dir, meta["tag"])
        ema_state = {k[len("ema.module."):]: v for k, v in module_state.items() if k.startswith("ema.module.")}
        if not ema_state:
            raise UserError(f"{run_dir}: --ema given but the run kept no weight EMA (finetune.ema_decay=0)")
        state = ema_state
        meta["ema"] = True
    out = out or f"{run_dir.rstrip('/')}/export/{os.path.basename(run_dir.rstrip('/'))}_{meta['tag']}.safetensors"
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_exported(state, meta, out)

    # read back exactly what a user would, and compare with the trained model
    loaded_state, loaded_meta = load_exported(out)
    try:
        exported = build_timm(loaded_meta, loaded_state)
    except RuntimeError as e:
        raise ExportMismatch(f"exported file does not load into timm with strict=True: {first_line(e)}") from None
    reference = reference_model(run_dir, state, loaded_meta["num_classes"])
    diff = check_outputs(reference, exported, fixed_input(loaded_meta))
    result = {"weights": out, "meta": meta_path(out), "timm_name": meta["timm_name"], "tag": meta["tag"],
              "tensors": len(state), "max_abs_diff": diff}
    if fmt == "hf":
        hf_dir = (out[: -len(".safetensors")] if out.endswith(".safetensors") else out) + "_hf"
        from pretrain.export.hf import write_hf

        result["hf_dir"] = write_hf(state, meta, hf_dir, check_against=exported, x=fixed_input(loaded_meta))
    return result


# ----------------------------------------------------------------------------- Hugging Face


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (<run.out_dir>/<run.name>) holding checkpoints/")
    parser.add_argument("--out", default=None,
                        help="output .safetensors (default: RUN_DIR/export/<name>_<tag>.safetensors); "
                             "the JSON goes next to it")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: checkpoints/latest)")
    parser.add_argument("--format", dest="fmt", choices=("safetensors", "hf"), default="safetensors",
                        help="hf: also write a Hugging Face transformers directory (needs `pip install transformers`)")
    parser.add_argument("--ema", action="store_true", help="export the weight EMA instead of the raw weights")


def run(args: argparse.Namespace) -> int:
    try:
        result = export(args.run_dir, args.out, args.tag, args.fmt, ema=args.ema)
    except ExportMismatch as e:
        print(f"vit-pretrain export: error: {e}", flush=True)
        return 1
    print(json.dumps(result, indent=2))
    return 0
