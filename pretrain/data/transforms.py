"""Decode + augment one sample to a uint8 (H, W, 3) array; normalisation happens later, on the device.

Train (supervised/finetune): timm's transform factory (`create_transform(..., separate=True,
use_prefetcher=True)`) supplies the RandomResizedCrop parameters, the flip probability, the auto-augment /
colour-jitter stage and random erasing. MAE and linear probing: RandomResizedCrop (bicubic) + flip, as
in the MAE recipe. Eval: resize to img_size / crop_pct, centre crop.

The crop itself is hand-written because neither timm nor torchvision can decode a JPEG at reduced size:
the crop box is drawn from the header's size, then PIL's draft mode decodes at 1/2, 1/4 or 1/8 scale
whenever the crop would still be at least the output size, and one `resize(box=...)` crops and scales.
"""
from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image

import pretrain._compat  # noqa: F401  makes timm importable on a CPU-only torch

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


def _rgb(img: Image.Image) -> Image.Image:
    img.load()  # decode (at the draft scale, if one was set)
    return img if img.mode == "RGB" else img.convert("RGB")


class BadSample(Exception):
    """A sample that is skipped and counted; args[0] is its kind."""


class Decoder:
    """Picklable per-sample decoder; `mode` is 'train', 'mae' or 'eval'."""

    def __init__(self, mode: str, img_size: int, data_cfg):
        from timm.data import create_transform
        from timm.data.random_erasing import RandomErasing
        from timm.data.transforms import RandomResizedCropAndInterpolation

        self.mode, self.size = mode, img_size
        self.secondary = None
        self.erase = None
        self.scale = tuple(data_cfg.crop_scale)
        self.ratio = (3 / 4, 4 / 3)
        self.hflip = data_cfg.hflip
        self.interp = Image.Resampling.BICUBIC
        self.mean, self.std = tuple(data_cfg.mean), tuple(data_cfg.std)
        self.crop_pct = data_cfg.eval_crop_pct
        if mode == "train":
            primary, secondary, final = create_transform(
                img_size, is_training=True, scale=self.scale, hflip=data_cfg.hflip,
                color_jitter=data_cfg.color_jitter or None, auto_augment=data_cfg.auto_augment or None,
                interpolation="bilinear", re_prob=data_cfg.reprob, re_mode="pixel", mean=self.mean, std=self.std,
                use_prefetcher=True, separate=True)
            rrc = next(t for t in primary.transforms if isinstance(t, RandomResizedCropAndInterpolation))
            self.scale, self.ratio = tuple(rrc.scale), tuple(rrc.ratio)
            self.interp = Image.Resampling.BILINEAR  # timm's default for supervised training
            self.secondary = secondary if len(secondary.transforms) else None
            if data_cfg.reprob > 0:
                self.erase = RandomErasing(data_cfg.reprob, mode="pixel", device="cpu")

    # -- crops ---------------------------------------------------------------------------------
    @staticmethod
    def _reduce(img: Image.Image, crop_w: float, crop_h: float, out: int) -> tuple[float, float]:
        """Draft-decode a JPEG at 1/f scale if the crop keeps >= `out` px per side; returns (sx, sy)."""
        if img.format != "JPEG":
            return 1.0, 1.0
        w, h = img.size
        f = next((f for f in (8, 4, 2) if min(crop_w, crop_h) / f >= out), 1)
        if f == 1:
            return 1.0, 1.0
        img.draft("RGB", (math.ceil(w / f), math.ceil(h / f)))
        return img.size[0] / w, img.size[1] / h

    def _random_crop(self, img: Image.Image) -> Image.Image:
        from timm.data.transforms import RandomResizedCropAndInterpolation

        top, left, h, w = RandomResizedCropAndInterpolation.get_params(img, self.scale, self.ratio)
        sx, sy = self._reduce(img, w, h, self.size)
        img = _rgb(img)
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        img = img.resize((self.size, self.size), self.interp, box=box)
        if random.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def _center_crop(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        scale_size = math.floor(self.size / self.crop_pct)
        crop = self.size * min(w, h) / scale_size  # the centre crop's side in source pixels
        sx, sy = self._reduce(img, crop, crop, self.size)
        img = _rgb(img)
        cx, cy = w / 2, h / 2
        box = ((cx - crop / 2) * sx, (cy - crop / 2) * sy, (cx + crop / 2) * sx, (cy + crop / 2) * sy)
        return img.resize((self.size, self.size), self.interp, box=box)

    # -- one sample ----------------------------------------------------------------------------
    def __call__(self, sample: dict) -> np.ndarray:
        """(H, W, 3) uint8; raises BadSample(kind) for a sample to skip."""
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise BadSample("not_image")
        data = sample[ext]
        if data is None:
            raise BadSample("truncated")
        if len(data) == 0:
            raise BadSample("empty_image")
        try:
            img = Image.open(io.BytesIO(data))
            img = self._center_crop(img) if self.mode == "eval" else self._random_crop(img)
            if self.secondary is not None:
                img = self.secondary(img)
        except Exception:  # noqa: BLE001  PIL raises many types for corrupt or truncated files
            raise BadSample("undecodable") from None
        arr = np.asarray(img, dtype=np.uint8)
        if self.erase is not None:
            arr = self._random_erase(arr)
        return arr

    def _random_erase(self, arr: np.ndarray) -> np.ndarray:
        """timm's RandomErasing works on normalised floats: normalise, erase, map back to uint8."""
        import torch

        mean = torch.tensor(self.mean).view(3, 1, 1) * 255
        std = torch.tensor(self.std).view(3, 1, 1) * 255
        x = (torch.from_numpy(arr).permute(2, 0, 1).float() - mean) / std
        x = self.erase(x) * std + mean
        return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
