"""`vit-pretrain eval WEIGHTS --data URLS`: top-1, top-5, loss and count as JSON, on one process or many.

`evaluate()` is the one evaluation loop (the trainer's periodic and final eval, this command, the
quickstart): counts are summed across ranks once, after the loop, because ranks may hold different
numbers of batches.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.errors import EXIT_PEER_FAILED, UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@torch.no_grad()
def evaluate(task_or_model: torch.nn.Module, stream, device, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
             dtype: torch.dtype = torch.float32, autocast=contextlib.nullcontext) -> dict:
    """{"top1", "top5" (fractions in [0, 1], as the trainer logs them), "loss" (mean cross-entropy), "n"}
    over every labelled sample of `stream`
    (batches of uint8 (B, C, H, W) images and int64 (B,) labels) on all ranks together; unlabelled samples
    (label -1) are left out. `dtype`: the model's input dtype; `autocast`: a context factory for the forward
    (the trainer's precision)."""
    from pretrain.data import normalize

    predict = getattr(task_or_model, "predict", task_or_model)
    was_training = task_or_model.training
    task_or_model.eval()
    # (correct@1, correct@5, summed loss, count) as one float64 vector: one all_reduce at the end
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels in stream:
        keep = labels >= 0  # unlabelled samples cannot be scored
        if not bool(keep.any()):
            continue
        images, labels = images[keep].to(device, non_blocking=True), labels[keep].to(device, non_blocking=True)
        with autocast():
            logits = predict(normalize(images, mean, std).to(dtype)).float()  # (B, K)
        k5 = min(5, logits.shape[1])
        top = logits.topk(k5, dim=1).indices  # (B, k5)
        hit = top.eq(labels[:, None])
        totals += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), F.cross_entropy(logits, labels, reduction="sum"),
                               torch.tensor(labels.numel(), device=device)]).double()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    task_or_model.train(was_training)
    c1, c5, loss, n = totals.tolist()
    n = int(n)
    return {"top1": c1 / max(n, 1), "top5": c5 / max(n, 1), "loss": loss / max(n, 1), "n": n}


def eval_config(meta: dict, batch_size: int, workers: int):
    """The Config the eval stream is built from: the exported model's input size, normalisation and
    eval crop (as the run that made it used them)."""
    from pretrain.config import load_config
    from pretrain.models import ARCHS

    k = meta["timm_kwargs"]
    overrides = [f"model.img_size={k['img_size']}", f"model.patch_size={k['patch_size']}",
                 f"data.batch_size={batch_size}", f"data.workers={workers}"]
    if meta.get("arch") in ARCHS:
        overrides.append(f"model.arch={meta['arch']}")
    if meta.get("mean") and meta.get("std"):
        overrides += [f"data.mean={list(meta['mean'])}", f"data.std={list(meta['std'])}"]
    if meta.get("eval_crop_pct"):
        overrides.append(f"data.eval_crop_pct={meta['eval_crop_pct']}")
    return load_config(None, overrides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", help="exported .safetensors (its .json next to it) or a run directory")
    parser.add_argument("--data", required=True, help="labelled shards: brace pattern, glob, list or <split>.json")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch per process")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers per process")
    parser.add_argument("--out", default=None, help="also write the JSON here (any fsspec URL)")


def run(args: argparse.Namespace) -> int:
    from pretrain import dist as pdist

    try:
        return _evaluate_weights(args)
    except BaseException as e:
        if not pdist.abort(e):  # says which rank failed and ends the peers now (see pretrain.dist)
            return EXIT_PEER_FAILED
        raise


def _evaluate_weights(args: argparse.Namespace) -> int:
    import fsspec

    from pretrain import dist as pdist
    from pretrain.data import build_eval_stream
    from pretrain.engine.export import build_timm, load_source

    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    env = pdist.resolve()
    if env.world_size > 1:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's op-build chatter: stdout is the JSON
            pdist.setup()
    device = (torch.device("cuda", pdist.device_index(env.local_rank, torch.cuda.device_count()))
              if torch.cuda.is_available() else torch.device("cpu"))
    state, meta = load_source(args.weights)
    if not meta["timm_kwargs"].get("num_classes"):
        raise UserError(f"{args.weights} has no classifier head (an MAE encoder?): fine-tune or linear-probe "
                        "it first, or use the k-NN monitor")
    model = build_timm(meta, state).to(device)
    cfg = eval_config(meta, args.batch_size, args.workers)
    stream = build_eval_stream(args.data, cfg, env.rank, env.world_size)
    result = evaluate(model, stream, device, mean=cfg.data.mean, std=cfg.data.std)
    result["weights"] = args.weights
    result["data"] = args.data
    if env.rank == 0:
        text = json.dumps(result, indent=2)
        sys.stdout.write(text + "\n")
        if args.out:
            with fsspec.open(args.out, "w") as f:
                f.write(text + "\n")
    pdist.teardown()
    return 0
