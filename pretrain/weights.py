"""The exported-file format: one `.safetensors` file with timm's key names, and a JSON next to it naming
the timm architecture and its arguments. The one contract that export writes and fine-tuning, eval,
visualize and the quickstart read; a leaf (it imports nothing of ours but the error type).

Loading never unpickles: safetensors cannot run code, and a PyTorch pickle is refused with a clear error.
"""
from __future__ import annotations

import json
from typing import Any

import fsspec
import torch

from pretrain.errors import UserError, first_line

FORMAT = "vit-pretrain-export/1"
"""`format` of the JSON's meta."""


def read_json(url: str) -> dict:
    with fsspec.open(url, "r") as f:
        return json.load(f)


def meta_path(weights: str) -> str:
    return (weights[: -len(".safetensors")] if weights.endswith(".safetensors") else weights) + ".json"


def save_exported(state: dict[str, torch.Tensor], meta: dict[str, Any], out: str) -> None:
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in state.items()},
                metadata={"format": "pt", "timm_name": meta["timm_name"]})
    with fsspec.open(out, "wb") as f:
        f.write(blob)
    with fsspec.open(meta_path(out), "w") as f:
        json.dump(meta, f, indent=2)


def load_exported(weights: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(timm-keyed state dict, meta) of an exported `.safetensors` file and its JSON."""
    from safetensors.torch import load

    try:
        with fsspec.open(weights, "rb") as f:
            state = load(f.read())
    except FileNotFoundError:
        raise UserError(f"weights file not found: {weights!r}") from None
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        if _is_pickle(weights):
            raise UserError(f"{weights} is a PyTorch pickle (.pt/.pth), not safetensors: vit-pretrain reads weights "
                            "only from safetensors, which cannot run code on load; export with `vit-pretrain "
                            "export`, or convert a state dict you trust with safetensors.torch.save_file") from None
        raise UserError(f"{weights}: not a readable safetensors file ({first_line(e)})") from None
    try:
        meta = read_json(meta_path(weights))
    except FileNotFoundError:
        raise UserError(f"{meta_path(weights)} not found: export writes it next to the weights; "
                        "keep the two together") from None
    return state, meta


def _is_pickle(path: str) -> bool:
    """Whether a file starts like torch.save's output: a zip archive, or a bare pickle (protocol 2+)."""
    try:
        with fsspec.open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) == 4 and head[0] == 0x80 and 2 <= head[1] <= 5)


def build_timm(meta: dict[str, Any], state: dict[str, torch.Tensor] | None = None):
    """A fresh plain-timm model from an export's meta, loaded with `strict=True` when `state` is given."""
    import timm

    model = timm.create_model(meta["timm_name"], pretrained=False, **meta["timm_kwargs"])
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


def fixed_input(meta: dict[str, Any], batch: int = 4) -> torch.Tensor:
    """A fixed normalised-looking input (B, C, H, W), the same on every machine."""
    g = torch.Generator().manual_seed(1234)
    k = meta["timm_kwargs"]
    side = k["img_size"]
    return torch.randn(batch, k.get("in_chans", 3), side, side, generator=g)
