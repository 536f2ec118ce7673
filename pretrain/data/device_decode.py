"""Decoding on the device (`data.decode: gpu`): the workers read each sample and draw its crop and flip, the
trainer's process decodes the batch, crops, resizes and flips it on the device.

The worker's half (`CropDraws`) makes exactly the draws the CPU path's `Decoder` makes, in the same order, from
the size in the image's header: the same samples get the same crops in the same order, so exact resume and
exactly-once hold as on the CPU path (after a JPEG that simplejpeg reads the header of but cannot decode, the
CPU path draws its crop a second time for PIL; the split draws once, so the rest of that batch's crops differ
from the CPU path's, not between runs). The main process's half (`BatchDecoder`) decodes at full size: on CUDA
with nvJPEG (torchvision, batched), elsewhere and for non-JPEG samples or any nvJPEG failure with simplejpeg or
PIL on the CPU; then crop, antialiased resize (the CPU path's interpolation) and flip run as torch ops on the
device. The CPU path decodes at a DCT-reduced scale where the crop allows, so pixels differ by rounding (well
under 2 grey levels on average), never in which sample or crop they show.

Augmentations with no device form (RandAugment, colour jitter, random erasing) are refused by the config;
`decode_rule` resolves `data.decode: auto`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import pretrain._compat  # noqa: F401  torchvision.io (nvJPEG) is imported below, on CUDA only
from pretrain.data.transforms import (BadSample, Decoder, crop_bounds, decode_for_crop, image_bytes, image_size,
                                      is_jpeg)
from pretrain.errors import UserError

log = logging.getLogger(__name__)

CPU_DECODE_CORES_PER_GPU = 8
"""PROVISIONAL (no GPU measurement yet): the CPU cores per GPU the CPU path needs, from docs/benchmarks.md
("Loader cores per GPU": ~810 img/s per worker core for crop + flip; MAE-B at its goal needs ~8 cores per GPU,
ViT-B supervised ~6 with the main process). Replace with the measured crossing point of `bench` item 1."""


def decode_rule(data_cfg, device: torch.device, cores_per_gpu: float) -> str:
    """`data.decode: auto` -> 'cpu' or 'gpu'. PROVISIONAL, until a GPU measures both paths: on the CPU 'cpu';
    on CUDA 'gpu' when every augmentation set has a device form and the CPU cores per GPU are fewer than
    CPU_DECODE_CORES_PER_GPU, else 'cpu'. One function, so the measured rule can replace it whole."""
    if device.type != "cuda" or data_cfg.host_only_augmentations():
        return "cpu"
    return "gpu" if cores_per_gpu < CPU_DECODE_CORES_PER_GPU else "cpu"


def cores_per_gpu() -> float:
    """CPU cores this process may run on over the GPUs it sees (one per rank under SLURM's binding, the node's
    under torchrun: both give the node's share per GPU)."""
    return len(os.sched_getaffinity(0)) / max(1, torch.cuda.device_count())


# ----------------------------------------------------------------------------- the workers' half


@dataclasses.dataclass
class Encoded:
    """One sample as a worker hands it over: its file, its crop in full-size pixels, its flip."""

    data: bytes
    box: tuple[float, float, float, float]  # (left, top, width, height)
    flip: bool


class CropDraws:
    """A picklable stand-in for `Decoder` in the workers: reads the header and draws the crop and flip, decodes
    nothing. Refuses a decoder with stages that need pixels (RandAugment, colour jitter, random erasing)."""

    def __init__(self, decoder: Decoder):
        if decoder.secondary is not None or decoder.erase is not None:
            raise UserError("data.decode=gpu cannot run data.auto_augment, data.color_jitter or data.reprob (they "
                            "have no device form): turn them off, or decode on the CPU (data.decode=cpu)")
        self.decoder = decoder

    def __call__(self, sample: dict) -> Encoded:
        """The sample's Encoded; raises BadSample(kind) for a sample to skip (as `Decoder` would)."""
        data = image_bytes(sample)
        try:
            w, h = image_size(data)
        except Exception:  # noqa: BLE001  no readable header: undecodable here, as on the CPU path
            raise BadSample("undecodable") from None
        box = self.decoder.box_of(w, h)
        return Encoded(data, box, self.decoder.draw_flip())


@dataclasses.dataclass
class EncodedBatch:
    """A worker's batch before decoding (an opaque object: the DataLoader passes it on as it is)."""

    samples: list[Encoded]  # (B,) in batch order, a filled place holding a copy of its filler
    counted: list[bool]  # (B,) False for a place filled in the worker: its failure is its filler's
    where: list[str]  # (B,) "KEY in shard URL": what the warning names when a place turns out undecodable
    sources: np.ndarray  # (B,) int64: each place's source (per-source bad counts)
    key: tuple[int, ...]  # the batch's identity (seed, epoch, layer, slot, k): seeds the fill, as the worker's


def encoded_batch(samples: list[Encoded], labels: list[int], counted: list[bool], where: list[str],
                  sources: np.ndarray, key: tuple[int, ...]) -> tuple[EncodedBatch, torch.Tensor]:
    """(EncodedBatch, labels (B,) int64): what the workers yield in place of `to_batch`'s pixels."""
    return EncodedBatch(samples, counted, where, sources, key), torch.tensor(labels, dtype=torch.int64)


# ----------------------------------------------------------------------------- the main process's half


def _decode_on_cpu(data: bytes) -> Optional[torch.Tensor]:
    """(3, H, W) uint8 at full size by simplejpeg or PIL (grey made RGB); None when neither can."""
    try:  # an `out` larger than any image: decode_for_crop's DCT reduction never applies
        arr, _ = decode_for_crop(data, lambda w, h: (0, 0, w, h), 1 << 30)
    except Exception:  # noqa: BLE001  decoders raise many types for corrupt or truncated files
        return None
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def _decode_on_cuda(datas: list[bytes], device: torch.device) -> list[Optional[torch.Tensor]]:
    """(3, H, W) uint8 on `device` by nvJPEG for the JPEGs, batched; None for the rest and for any it fails on
    (a failed batch is retried one file at a time, so one bad file costs only its own place)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[Optional[torch.Tensor]] = [None] * len(datas)
    jpegs = [i for i, d in enumerate(datas) if is_jpeg(d)]
    files = [torch.from_numpy(np.frombuffer(datas[i], np.uint8).copy()) for i in jpegs]
    if not files:
        return out
    try:
        decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = []
        for f in files:
            try:
                decoded.append(decode_jpeg(f, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    for i, img in zip(jpegs, decoded):
        out[i] = img
    return out


def crop_resize_on_device(img: torch.Tensor, box, out: int, mode: str, flip: bool) -> torch.Tensor:
    """(3, H, W) uint8 -> the crop `box` (left, top, w, h) resized to (3, out, out) uint8 with antialiasing,
    flipped when asked: the CPU path's `crop_resize`, in float32 on the image's device."""
    y0, y1, x0, x1 = crop_bounds(box, img.shape[1], img.shape[2])
    x = img[None, :, y0:y1, x0:x1].float()  # (1, 3, h, w)
    x = F.interpolate(x, size=(out, out), mode=mode, antialias=True, align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8)[0]
    return x.flip(-1) if flip else x


class BatchDecoder:
    """An EncodedBatch -> uint8 (B, 3, size, size) on `device`; `mode` is the CPU path's interpolation."""

    def __init__(self, size: int, mode: str, device: torch.device):
        self.size, self.mode, self.device = size, mode, torch.device(device)

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, list[int]]:
        """(images, the places no decoder could read): those are filled from the batch's other images, drawn
        from the batch's key, so a resume fills them alike."""
        full = self._decode(batch)
        failed = [i for i, img in enumerate(full) if img is None]
        good = [i for i, img in enumerate(full) if img is not None]
        if not good:
            raise UserError(f"all {len(full)} samples of a batch were undecodable (first: "
                            f"{batch.where[0]}); check the shards")
        images = torch.empty((len(full), 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        for i in good:
            s = batch.samples[i]
            images[i] = crop_resize_on_device(full[i], s.box, self.size, self.mode, s.flip)
        if failed:
            fill = np.random.default_rng(np.random.SeedSequence(list(batch.key))).integers(0, len(good), len(full))
            for i in failed:
                images[i] = images[good[fill[i]]]
        return images, failed

    def _decode(self, batch: EncodedBatch) -> list[Optional[torch.Tensor]]:
        """Each place's image at full size on the device: nvJPEG on CUDA, the CPU for what it leaves."""
        datas = [s.data for s in batch.samples]
        full = _decode_on_cuda(datas, self.device) if self.device.type == "cuda" else [None] * len(datas)
        for i, data in enumerate(datas):
            if full[i] is None:
                img = _decode_on_cpu(data)
                if img is None and batch.counted[i]:
                    log.warning("skipping undecodable sample %s (decoded in the main process)", batch.where[i])
                full[i] = img.to(self.device) if img is not None else None
        return full
