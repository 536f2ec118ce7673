"""`vit-pretrain export RUN_DIR`: a DeepSpeed checkpoint (any ZeRO stage, any world size) -> one
safetensors file with timm's key names + a JSON naming the timm architecture and its arguments.

After writing, the file is read back into a fresh `timm.create_model(name, pretrained=False, **kwargs)`
with `strict=True`, and its logits (features for MAE) on a fixed input must match the trained model's;
a mismatch is an error. `--format hf` also writes a Hugging Face transformers directory.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import tempfile
from typing import Any

import fsspec
import torch

from pretrain.errors import UserError

log = logging.getLogger(__name__)

# Arguments of timm's VisionTransformer that define the inference architecture (drop path is a
# training-time option, our `pos_embed`/`grad_checkpointing` are not timm's).
ARCH_KEYS = ("img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth",
             "num_heads", "mlp_ratio", "qkv_bias")
# Architecture options (model.reg_tokens, init_values, qk_norm), exported only when set, so exports
# without them keep their arguments.
OPTION_KEYS = ("reg_tokens", "init_values", "qk_norm")
# timm's generic name for non-timm sizes: every architecture number is passed explicitly, so the
# name only picks timm's ViT factory (and its default pretrained config).
GENERIC_TIMM_NAME = "vit_base_patch16_224"
# The factory for a SwiGLU MLP: JSON cannot name timm's layer classes, but this registration passes
# mlp_layer=SwiGLUPacked and act_layer=SiLU itself; its other defaults (LayerScale 1e-5, size) are
# overridden by the explicit arguments.
SWIGLU_TIMM_NAME = "vit_giant_patch14_dinov2"
# `model.rope`: timm's Eva. This registration's defaults (EVA-02 sizes, SwiGLU, RoPE, ref_feat_shape) are all
# overridden by explicit arguments.
ROPE_TIMM_NAME = "eva02_tiny_patch14_224"
# `model.conv_stem`: the hybrid ViT whose stem is ResNetV2's (no stages), as `pretrain.models.vit` builds it.
CONV_STEM_TIMM_NAME = "vit_tiny_r_s16_p8_224"


class ExportMismatch(RuntimeError):
    """The exported file does not reproduce the trained model's outputs (a bug, not a user error)."""


# ----------------------------------------------------------------------------- run directory


def _fs(url: str):
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def read_json(url: str) -> dict:
    with fsspec.open(url, "r") as f:
        return json.load(f)


def resolve_tag(run_dir: str, tag: str | None = None) -> str:
    """The checkpoint tag to export: `tag`, or the one named by `checkpoints/latest`."""
    fs, root = _fs(run_dir)
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


@contextlib.contextmanager
def _local_dir(url: str):
    """A local path for `url` (a folder): itself when local, else a temporary copy (zero_to_fp32 reads
    with os.path, so remote checkpoints are fetched first)."""
    from fsspec.implementations.local import LocalFileSystem

    fs, path = _fs(url)
    if isinstance(fs, LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        yield tmp


def consolidate(run_dir: str, tag: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The full fp32 module state dict of a run's checkpoint (any ZeRO stage, any world size), and its tag."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pretrain.engine.checkpoint import check_torch_files

    tag = resolve_tag(run_dir, tag)
    with _local_dir(f"{run_dir.rstrip('/')}/checkpoints/{tag}") as ck:
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
            raise UserError(f"unreadable checkpoint {run_dir}/checkpoints/{tag}: {str(e).splitlines()[0]}") from None
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
    spec = dict(meta["create_model"])
    if "kwargs" in spec:
        name, kwargs = spec["name"], dict(spec["kwargs"])
    else:
        name = spec.pop("name")
        kwargs = spec
    return {"task": meta.get("task", ""), "name": name, "kwargs": kwargs,
            "num_classes": meta.get("num_classes", kwargs.get("num_classes", 0))}


def timm_spec(name: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(timm model name, keyword arguments) that rebuild the architecture in plain timm."""
    from pretrain.models import ARCHS, TIMM_NAMES
    from pretrain.models.vit import CONV_STEM_STRIDE, eva_kwargs

    full = dict(ARCHS.get(name, {}), num_classes=1000, global_pool="token", qkv_bias=True)
    full.update({k: v for k, v in kwargs.items() if v is not None})
    out = {k: full[k] for k in ARCH_KEYS if k in full}
    out.update({k: full[k] for k in OPTION_KEYS if full.get(k)})
    if full.get("dynamic_img_size"):
        out["dynamic_img_size"] = True
    pos_embed, mlp = full.get("pos_embed", "learned"), full.get("mlp", "gelu")
    if full.get("rope"):
        eva = eva_kwargs(out, pos_embed, mlp)
        eva["ref_feat_shape"] = list(eva["ref_feat_shape"])  # JSON
        return ROPE_TIMM_NAME, eva
    if pos_embed == "none":
        out["pos_embed"] = "none"
    if full.get("conv_stem"):
        out["patch_size"] = full["patch_size"] // CONV_STEM_STRIDE  # over the stem's stride-4 feature map
        return CONV_STEM_TIMM_NAME, out
    if mlp == "swiglu":
        # no LayerScale must override the factory's 1e-5: timm.create_model drops None arguments, and
        # its Block builds LayerScale only for a truthy init_values, so 0.0 says "none"
        out["init_values"] = full.get("init_values") or 0.0
        return SWIGLU_TIMM_NAME, out
    return (name if name in TIMM_NAMES else GENERIC_TIMM_NAME), out


# ----------------------------------------------------------------------------- exported files


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
        raise UserError(f"{weights}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
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


def load_source(source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Timm-keyed weights + meta from an exported `.safetensors` file or a run directory (exported in memory)."""
    fs, path = _fs(source)
    if fs.isdir(path):
        return export_state(source)
    return load_exported(source)


def export_state(run_dir: str, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A run's encoder weights with timm keys and the meta that goes next to them."""
    module_state, tag = consolidate(run_dir, tag)
    rm = run_meta(run_dir)
    state = encoder_state(module_state)
    timm_name, kwargs = timm_spec(rm["name"], rm["kwargs"])
    if "head.weight" not in state:
        kwargs["num_classes"] = 0
    meta: dict[str, Any] = {
        "format": "vit-pretrain-export/1",
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
    fs, path = _fs(url)
    if not fs.isfile(path):
        return None
    return load_config(url)


def _class_names(cfg) -> list[str]:
    if not cfg.data.train_urls:
        return []
    try:
        from pretrain.data import read_index

        return list(read_index(cfg.data.train_urls).classes)
    except Exception:  # the shards may live elsewhere now; names are a convenience, not required
        return []


# ----------------------------------------------------------------------------- the check


def fixed_input(meta: dict[str, Any], batch: int = 4) -> torch.Tensor:
    """A fixed normalised-looking input (B, C, H, W), the same on every machine."""
    g = torch.Generator().manual_seed(1234)
    k = meta["timm_kwargs"]
    side = k["img_size"]
    return torch.randn(batch, k.get("in_chans", 3), side, side, generator=g)


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
    fs, path = _fs(out)
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_exported(state, meta, out)

    # read back exactly what a user would, and compare with the trained model
    loaded_state, loaded_meta = load_exported(out)
    try:
        exported = build_timm(loaded_meta, loaded_state)
    except RuntimeError as e:
        raise ExportMismatch(f"exported file does not load into timm with strict=True: {str(e).splitlines()[0]}") from None
    reference = reference_model(run_dir, state, loaded_meta["num_classes"])
    diff = check_outputs(reference, exported, fixed_input(loaded_meta))
    result = {"weights": out, "meta": meta_path(out), "timm_name": meta["timm_name"], "tag": meta["tag"],
              "tensors": len(state), "max_abs_diff": diff}
    if fmt == "hf":
        hf_dir = (out[: -len(".safetensors")] if out.endswith(".safetensors") else out) + "_hf"
        result["hf_dir"] = write_hf(state, meta, hf_dir, check_against=exported, x=fixed_input(loaded_meta))
    return result


# ----------------------------------------------------------------------------- Hugging Face


def hf_state_dict(state: dict[str, torch.Tensor], depth: int, prefix: str, head: bool) -> dict[str, torch.Tensor]:
    """timm ViT keys -> transformers ViT keys (fused qkv split into query/key/value).

    transformers ships no converter for this direction as a library function (its
    convert_vit_timm_to_pytorch.py is a script that downloads from the hub), hence the table.
    """
    out = {
        f"{prefix}embeddings.cls_token": state["cls_token"],
        f"{prefix}embeddings.position_embeddings": state["pos_embed"],
        f"{prefix}embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        f"{prefix}embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        f"{prefix}layernorm.weight": state["norm.weight"],
        f"{prefix}layernorm.bias": state["norm.bias"],
    }
    for i in range(depth):
        t, h = f"blocks.{i}.", f"{prefix}encoder.layer.{i}."
        for name, part in zip(("query", "key", "value"), state[t + "attn.qkv.weight"].chunk(3, dim=0)):
            out[f"{h}attention.attention.{name}.weight"] = part
        for name, part in zip(("query", "key", "value"), state[t + "attn.qkv.bias"].chunk(3, dim=0)):
            out[f"{h}attention.attention.{name}.bias"] = part
        for ours, theirs in (("attn.proj", "attention.output.dense"), ("norm1", "layernorm_before"),
                             ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"),
                             ("mlp.fc2", "output.dense")):
            out[f"{h}{theirs}.weight"] = state[f"{t}{ours}.weight"]
            out[f"{h}{theirs}.bias"] = state[f"{t}{ours}.bias"]
    if head:
        out["classifier.weight"], out["classifier.bias"] = state["head.weight"], state["head.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def write_hf(state: dict[str, torch.Tensor], meta: dict[str, Any], out_dir: str, *, check_against=None,
             x: torch.Tensor | None = None) -> str:
    """A transformers directory: ViTForImageClassification (class-token head), ViTModel (no head) or
    ViTMAEModel (MAE encoders). Checked against the timm model on `x` when given."""
    try:
        import transformers
    except ImportError:
        raise UserError("--format hf needs transformers: pip install 'vit-pretrain[hf]' (or transformers)") from None
    k = meta["timm_kwargs"]
    if k.get("global_pool", "token") != "token" or "fc_norm.weight" in state:
        raise UserError(f"--format hf: transformers' ViT pools the class token; this model uses "
                        f"global_pool={k.get('global_pool')!r}. Use the safetensors export with timm")
    if not k.get("qkv_bias", True):
        raise UserError("--format hf: transformers' ViT needs qkv_bias=True")
    extra = [key for key in OPTION_KEYS if k.get(key)]
    extra += {SWIGLU_TIMM_NAME: ["mlp=swiglu"], ROPE_TIMM_NAME: ["rope"],
              CONV_STEM_TIMM_NAME: ["conv_stem"]}.get(meta["timm_name"], [])
    if k.get("pos_embed") == "none":
        extra.append("pos_embed=none")
    if extra:
        raise UserError(f"--format hf: transformers' ViT has no {', '.join(extra)}; use the safetensors export "
                        "with timm")
    num_classes = int(k.get("num_classes", 0) or 0)
    mae = meta.get("task") == "mae"
    common = dict(hidden_size=k["embed_dim"], num_hidden_layers=k["depth"], num_attention_heads=k["num_heads"],
                  intermediate_size=int(k["embed_dim"] * k["mlp_ratio"]), hidden_act="gelu", layer_norm_eps=1e-6,
                  image_size=k["img_size"], patch_size=k["patch_size"], num_channels=k.get("in_chans", 3),
                  qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if mae:
        config, cls = transformers.ViTMAEConfig(**common, mask_ratio=0.0), transformers.ViTMAEModel
    elif num_classes:
        config, cls = transformers.ViTConfig(**common, num_labels=num_classes), transformers.ViTForImageClassification
        names = meta.get("class_names") or []
        if len(names) == num_classes:
            config.id2label = dict(enumerate(names))
            config.label2id = {n: i for i, n in enumerate(names)}
    else:
        config, cls = transformers.ViTConfig(**common), transformers.ViTModel
    config.architectures = [cls.__name__]
    prefix = "vit." if (num_classes and not mae) else ""
    hf_state = hf_state_dict(state, k["depth"], prefix, head=bool(num_classes) and not mae)
    from safetensors.torch import save_file

    with _local_out(out_dir) as local:
        # the checkpoint layout transformers has always read (newer versions rename keys on load)
        config.save_pretrained(local)
        save_file(hf_state, os.path.join(local, "model.safetensors"), metadata={"format": "pt"})
        kwargs = {"add_pooling_layer": False} if cls is transformers.ViTModel else {}
        model = cls.from_pretrained(local, **kwargs).eval()  # read back as a user would
        if check_against is not None and x is not None:
            with torch.no_grad():
                out = model(pixel_values=x)
                got = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state[:, 0]
                want = check_against(x)
            diff = (got.float() - want.float()).abs().max().item()
            if not diff <= 1e-4 * max(want.abs().max().item(), 1.0):
                raise ExportMismatch(f"transformers model differs from the timm model by {diff:.3g}")
    return out_dir


@contextlib.contextmanager
def _local_out(url: str):
    """A local folder to write into, uploaded to `url` afterwards when `url` is remote."""
    from fsspec.implementations.local import LocalFileSystem

    fs, path = _fs(url)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        fs.put(tmp.rstrip("/") + "/", path, recursive=True)


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
