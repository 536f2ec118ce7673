"""`vit-pretrain export --format hf`: a Hugging Face transformers directory from an exported timm ViT."""
from __future__ import annotations

import os
from typing import Any

import torch

from pretrain.errors import UserError
from pretrain.export import ExportMismatch
from pretrain.fs import local_out
from pretrain.models.timm_spec import CONV_STEM_TIMM_NAME, OPTION_KEYS, ROPE_TIMM_NAME, SWIGLU_TIMM_NAME


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

    with local_out(out_dir) as local:
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


