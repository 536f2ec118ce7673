"""A run directory's weights in one piece: its DeepSpeed checkpoint (any ZeRO stage, any world size)
consolidated to a full fp32 state dict, the encoder's part with timm's key names, and the export meta
that goes next to them. Export writes these; fine-tuning and visualize read a run directory through them.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import fsspec
import torch

from pretrain.engine.trust import check_torch_files
from pretrain.errors import UserError, first_line
from pretrain.fs import local_copy
from pretrain.models.timm_spec import timm_spec
from pretrain.weights import FORMAT, load_exported, read_json


def resolve_tag(run_dir: str, tag: str | None = None) -> str:
    """The checkpoint tag to export: `tag`, or the one named by `checkpoints/latest`."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    ck = f"{root.rstrip('/')}/checkpoints"
    if tag:
        if not fs.isdir(f"{ck}/{tag}"):
            have = sorted(os.path.basename(p) for p in fs.ls(ck) if fs.isdir(p)) if fs.isdir(ck) else []
            raise UserError(f"no checkpoint {tag!r} in {run_dir}/checkpoints; have: {', '.join(have) or 'none'}")
        return tag
    if not fs.isfile(f"{ck}/latest"):
        raise UserError(f"{run_dir} has no checkpoints/latest: not a finished or checkpointed run directory "
                        "(pass the run directory `<run.out_dir>/<run.name>`, or --tag)")
    with fs.open(f"{ck}/latest", "r") as f:
        return f.read().strip()


def consolidate(run_dir: str, tag: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The full fp32 module state dict of a run's checkpoint (any ZeRO stage, any world size), and its tag."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = resolve_tag(run_dir, tag)
    with local_copy(f"{run_dir.rstrip('/')}/checkpoints/{tag}") as ck:
        # zero_to_fp32 and the read below unpickle with weights_only=False
        check_torch_files(ck, f"unreadable checkpoint {run_dir}/checkpoints/{tag}")
        has_zero = any(name.endswith("_optim_states.pt") and name.startswith(("zero_", "bf16_zero_"))
                       for name in os.listdir(ck))
        try:
            sd: dict[str, torch.Tensor] = {}
            if has_zero:
                # zero_to_fp32 prints progress on stdout: keep the command's output to our own lines
                with contextlib.redirect_stdout(io.StringIO()):
                    sd = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ck), tag=os.path.basename(ck))
            whole = os.path.join(ck, "mp_rank_00_model_states.pt")
            if os.path.isfile(whole):
                # Stages 0-2 also keep the whole module there. It supplies what zero_to_fp32 leaves out:
                # everything at stage 0, and frozen parameters (MAE's sin-cos positions) at stages 0-1,
                # where DeepSpeed records no frozen-parameter fragments. The fp32 master weights win.
                # DeepSpeed pickles its own metadata in this file, so weights_only=True cannot read it
                # (zero_to_fp32 reads it the same way); check_torch_files found it calls nothing else.
                blob = torch.load(whole, map_location="cpu", weights_only=False)
                for k, v in (blob.get("module") or {}).items():
                    if k not in sd:
                        sd[k] = v.float() if v.is_floating_point() else v
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise UserError(f"unreadable checkpoint {run_dir}/checkpoints/{tag}: {first_line(e)}") from None
        if not sd:
            raise UserError(f"unreadable checkpoint {run_dir}/checkpoints/{tag}: no model states found")
    return {k: v.contiguous() for k, v in sd.items()}, tag


def encoder_state(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm key names: the `encoder.` part of a Task's state dict with the prefix stripped.

    A linear probe's BatchNorm (no affine) in front of the head is folded into the head, so the
    result is a plain timm ViT.
    """
    enc = {k[len("encoder."):]: v for k, v in module_state.items() if k.startswith("encoder.")}
    if not enc:
        some = ", ".join(list(module_state)[:5])
        raise UserError(f"checkpoint holds no `encoder.` weights (keys start: {some}): not a vit-pretrain run")
    if "head_bn.running_mean" in module_state and "head.weight" in enc:
        mean, var = module_state["head_bn.running_mean"].float(), module_state["head_bn.running_var"].float()
        eps = float(module_state.get("head_bn.eps", torch.tensor(1e-6)))
        inv = torch.rsqrt(var + eps)  # (D,)
        w, b = enc["head.weight"].float(), enc["head.bias"].float()
        enc["head.weight"] = w * inv[None, :]
        enc["head.bias"] = b - (w * (mean * inv)[None, :]).sum(1)
    return enc


def run_meta(run_dir: str) -> dict[str, Any]:
    """model.json of a run directory, normalised to {"task", "name", "kwargs", "num_classes"}."""
    url = f"{run_dir.rstrip('/')}/model.json"
    try:
        meta = read_json(url)
    except FileNotFoundError:
        raise UserError(f"{run_dir} has no model.json: not a vit-pretrain run directory") from None
    kwargs = dict(meta["create_model"])  # timm's create_model arguments (pretrain.tasks.model_record)
    name = kwargs.pop("name")
    return {"task": meta["task"], "name": name, "kwargs": kwargs, "num_classes": meta["num_classes"]}


def load_source(source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Timm-keyed weights + meta from an exported `.safetensors` file or a run directory (exported in memory)."""
    fs, path = fsspec.core.url_to_fs(source)
    if fs.isdir(path):
        return export_state(source)
    return load_exported(source)


def export_state(run_dir: str, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A run's encoder weights with timm keys and the meta that goes next to them."""
    return exported(run_dir, *consolidate(run_dir, tag))


def exported(run_dir: str, module_state: dict[str, torch.Tensor], tag: str) -> tuple[dict[str, torch.Tensor],
                                                                                   dict[str, Any]]:
    """(timm-keyed encoder weights, export meta) of a run's consolidated module state (`consolidate`)."""
    rm = run_meta(run_dir)
    state = encoder_state(module_state)
    timm_name, kwargs = timm_spec(rm["name"], rm["kwargs"])
    if "head.weight" not in state:
        kwargs["num_classes"] = 0
    meta: dict[str, Any] = {
        "format": FORMAT,
        "timm_name": timm_name,
        "timm_kwargs": kwargs,
        "arch": rm["name"],
        "img_size": kwargs.get("img_size"),
        "patch_size": kwargs.get("patch_size"),
        "global_pool": kwargs.get("global_pool"),
        "num_classes": kwargs.get("num_classes", 0),
        "class_names": [],
        "task": rm["task"],
        "tag": tag,
        "mean": None,
        "std": None,
        "eval_crop_pct": None,
    }
    cfg = _run_config(run_dir)
    if cfg is not None:
        meta["mean"], meta["std"] = list(cfg.data.mean), list(cfg.data.std)
        meta["eval_crop_pct"] = cfg.data.eval_crop_pct
        meta["class_names"] = _class_names(cfg)
    return state, meta


def _run_config(run_dir: str):
    from pretrain.config import load_config

    url = f"{run_dir.rstrip('/')}/config.yaml"
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        return None
    return load_config(url)


def _class_names(cfg) -> list[str]:
    """The class names the run learnt: its shards' (a mixture's: the sources' shared or united list)."""
    d = cfg.data
    if not d.train_urls and not d.sources:
        return []
    try:
        from pretrain.data import read_index
        from pretrain.data.stream import mixture_classes

        if not d.sources:
            return list(read_index(d.train_urls).classes)
        lists = [list(read_index(src.train_urls).classes) for src in d.sources]
        return mixture_classes(lists, [f"data.sources[{i}]" for i in range(len(lists))], d.source_classes, True)[0]
    except Exception:  # the shards may live elsewhere now; names are a convenience, not required
        return []
