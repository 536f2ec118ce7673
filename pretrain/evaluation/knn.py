"""Weighted k-NN monitor of encoder features (the DINO evaluation), cheap enough to run during pretraining.

Neither MAE, timm nor DeiT has one; a rising `knn_top1` says the encoder is learning useful features
long before a fine-tune would. Features are the encoder's pre-logits (the input of its head), L2
normalised; the train memory is gathered from every rank, each rank scores its own val samples, and
the counts are summed once at the end.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pretrain._compat  # noqa: F401  before timm: makes it importable on a CPU-only torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


@torch.no_grad()
def features(encoder: torch.nn.Module, stream, device, mean, std,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) fp32 L2-normalised, labels (N,)) of the labelled samples of `stream` on this rank;
    images enter the encoder as `dtype` (the encoder's own under DeepSpeed fp16 / bf16 mode).

    The features are captured as the input of `encoder.head` while calling `encoder(...)` itself, so
    ZeRO-3's per-module parameter gathering sees an ordinary forward.
    """
    from pretrain.data import normalize

    captured: list[torch.Tensor] = []
    hook = encoder.head.register_forward_hook(lambda m, args, out: captured.append(args[0].float()))
    feats, labels = [], []
    try:
        for images, y in stream:
            encoder(normalize(images.to(device, non_blocking=True), mean, std).to(dtype))
            feats.append(F.normalize(captured.pop(), dim=1))
            labels.append(y.to(device))
    finally:
        hook.remove()
    if not feats:
        dim = encoder.num_features
        return torch.zeros(0, dim, device=device), torch.zeros(0, dtype=torch.long, device=device)
    f, y = torch.cat(feats), torch.cat(labels)
    keep = y >= 0
    return f[keep], y[keep]


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows of `x` (ranks may hold different row counts)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    pad = torch.zeros((top - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    out = [torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(world)]
    dist.all_gather(out, torch.cat([x, pad]))
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def knn_classify(train_f, train_y, val_f, k: int, temperature: float, num_classes: int,
                 chunk: int = 1024) -> torch.Tensor:
    """DINO's weighted vote: each of the k nearest (cosine) train samples votes exp(sim / T) for its class."""
    k = min(k, train_f.shape[0])
    preds = []
    for start in range(0, val_f.shape[0], chunk):
        sim = val_f[start:start + chunk] @ train_f.T  # (b, N)
        top_sim, idx = sim.topk(k, dim=1)  # (b, k)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=val_f.device)


def knn_top1(encoder: torch.nn.Module, train_stream, val_stream, k: int, temperature: float, device,
             *, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, dtype: torch.dtype = torch.float32) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of the weighted k-NN classifier, over all ranks' val samples."""
    was_training = encoder.training
    encoder.eval()
    try:
        train_f, train_y = features(encoder, train_stream, device, mean, std, dtype)
        val_f, val_y = features(encoder, val_stream, device, mean, std, dtype)
    finally:
        encoder.train(was_training)
    train_f, train_y = _all_gather_rows(train_f), _all_gather_rows(train_y)
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # (correct, n)
    if train_f.shape[0] and val_f.shape[0]:
        num_classes = int(max(train_y.max().item(), val_y.max().item())) + 1
        pred = knn_classify(train_f, train_y, val_f, k, temperature, num_classes)
        counts += torch.tensor([(pred == val_y).sum().item(), val_y.numel()], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    return counts[0].item() / max(counts[1].item(), 1.0)
