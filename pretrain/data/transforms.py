"""Decode + augment one sample to a uint8 (H, W, 3) array; normalisation happens later, on the device.

Train (supervised/finetune): timm's transform factory (`create_transform(..., separate=True,
use_prefetcher=True)`) supplies the RandomResizedCrop parameters, the flip probability, the auto-augment /
colour-jitter stage and random erasing. MAE and linear probing: RandomResizedCrop (bicubic) + flip, as
in the MAE recipe. Eval: resize to img_size / crop_pct, centre crop.

The crop + resize is hand-written because neither timm nor torchvision decodes as little as the crop
allows: the crop box is drawn from the size in the file's header (timm's sampler), the JPEG is decoded
at 1/2, 1/4 or 1/8 scale (DCT scaling) whenever the crop still keeps the output size, and the resize runs
on the uint8 pixels with torch's antialiased kernel (vectorised for uint8 channels-last; ~5x faster than
PIL's resize here, same result to rounding). simplejpeg (libjpeg-turbo) decodes when installed, PIL
otherwise.
"""
from __future__ import annotations

import functools
import io
import math
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import pretrain._compat  # noqa: F401  makes timm importable on a CPU-only torch

try:
    import simplejpeg as _simplejpeg
except ImportError:  # optional speed-up (`pip install simplejpeg`); PIL decodes without it
    _simplejpeg = None

# PIL hands out read-only pixel arrays; we only read them (the crop below copies), so torch's notice is noise
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
MODES = ("train", "mae", "eval")
"""The decoder's augmentation modes (see the module docstring)."""


class BadSample(Exception):
    """A sample that is skipped and counted; args[0] is its kind."""


def _scale_for(crop_w: float, crop_h: float, out: int) -> int:
    """Largest DCT reduction (8, 4, 2 or 1) that keeps at least `out` px on the crop's shorter side."""
    return next((f for f in (8, 4, 2) if min(crop_w, crop_h) / f >= out), 1)


def is_jpeg(data: bytes) -> bool:
    """Whether the file starts with JPEG's start-of-image marker."""
    return data[:2] == b"\xff\xd8"


def decode_for_crop(data: bytes, box_of, out: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """(RGB uint8 (h, w, 3) decoded at a reduced scale where allowed, crop box in those pixels).

    `box_of(w, h) -> (left, top, width, height)` chooses the crop in full-size pixels from the header.
    """
    if _simplejpeg is not None and is_jpeg(data):
        try:
            h, w, _, _ = _simplejpeg.decode_jpeg_header(data)
            left, top, cw, ch = box_of(w, h)
            f = _scale_for(cw, ch, out)
            arr = _simplejpeg.decode_jpeg(data, "RGB", min_height=math.ceil(h / f), min_width=math.ceil(w / f))
            sx, sy = arr.shape[1] / w, arr.shape[0] / h
            return arr, (left * sx, top * sy, cw * sx, ch * sy)
        except ValueError:
            pass  # CMYK, unusual or corrupt JPEGs: PIL decides below
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    left, top, cw, ch = box_of(w, h)
    f = _scale_for(cw, ch, out)
    if img.format == "JPEG" and f > 1:
        img.draft("RGB", (math.ceil(w / f), math.ceil(h / f)))
    img.load()
    sx, sy = img.size[0] / w, img.size[1] / h
    arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    return arr, (left * sx, top * sy, cw * sx, ch * sy)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header, read by the decoders `decode_for_crop` would try, in its order."""
    if _simplejpeg is not None and is_jpeg(data):
        try:
            h, w, _, _ = _simplejpeg.decode_jpeg_header(data)
            return w, h
        except ValueError:
            pass  # PIL decides, as in decode_for_crop
    return Image.open(io.BytesIO(data)).size  # lazy: reads the header only


def crop_bounds(box, height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the pixels of `box` (left, top, w, h) in an image of that size, at least one each way."""
    left, top, cw, ch = box
    x0, y0 = max(0, int(round(left))), max(0, int(round(top)))
    x1 = min(width, max(x0 + 1, int(round(left + cw))))
    y1 = min(height, max(y0 + 1, int(round(top + ch))))
    return y0, y1, x0, x1


def crop_resize(arr: np.ndarray, box, out: int, mode: str, flip: bool = False) -> np.ndarray:
    """Crop `box` (left, top, w, h) of (H, W, 3) uint8 and resize to (out, out, 3) with antialiasing."""
    y0, y1, x0, x1 = crop_bounds(box, arr.shape[0], arr.shape[1])
    x = torch.from_numpy(arr).permute(2, 0, 1)[None, :, y0:y1, x0:x1]  # (1, 3, h, w) view of HWC memory
    x = x.contiguous(memory_format=torch.channels_last)  # the vectorised uint8 kernel wants channels-last
    x = F.interpolate(x, size=(out, out), mode=mode, antialias=True, align_corners=False)
    if flip:
        x = x.flip(-1)
    return x[0].permute(1, 2, 0).numpy()  # (out, out, 3), HWC memory: no copy


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, with 0 bits kept giving the black image it always meant (old Pillow's result)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transforms) -> None:
    """RandAugment's increasing posterize (`inc1`, as in the DeiT and MAE fine-tune recipes) keeps
    4 - int(m / 10 * 4) bits: 0 at magnitude 10, which m9 with mstd0.5 reaches in ~2% of its draws.
    timm (1.0.31) hands that 0 to Pillow, whose current releases (13.0 here) raise "bits must be between
    or equal to 1 and 8", which ended the run. Our ops get a posterize that accepts 0; timm stays as it is."""
    for t in getattr(transforms, "transforms", []):
        for op in getattr(t, "ops", []):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize


def image_bytes(sample: dict) -> bytes:
    """The sample's image file; raises BadSample when it has none, or an empty or truncated one."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadSample("not_image")
    data = sample[ext]
    if data is None:
        raise BadSample("truncated")
    if len(data) == 0:
        raise BadSample("empty_image")
    return data


class Decoder:
    """Picklable per-sample decoder; `mode` is 'train' (timm factory), 'mae' (crop + flip) or 'eval'."""

    def __init__(self, mode: str, img_size: int, data_cfg):
        from timm.data import create_transform
        from timm.data.random_erasing import RandomErasing
        from timm.data.transforms import RandomResizedCropAndInterpolation

        if mode not in MODES:
            raise ValueError(f"augmentation mode {mode!r}: expected one of {', '.join(MODES)}")
        self.mode, self.size = mode, img_size
        self.secondary = None
        self.erase = None
        self.scale = tuple(data_cfg.crop_scale)
        self.ratio = (3 / 4, 4 / 3)
        self.hflip = data_cfg.hflip
        self.interp = "bicubic"  # MAE recipe and timm's eval default
        self.mean, self.std = tuple(data_cfg.mean), tuple(data_cfg.std)
        self.crop_pct = data_cfg.eval_crop_pct
        if mode == "train":
            primary, secondary, _ = create_transform(
                img_size, is_training=True, scale=self.scale, hflip=data_cfg.hflip,
                color_jitter=data_cfg.color_jitter or None, auto_augment=data_cfg.auto_augment or None,
                interpolation="bilinear", re_prob=data_cfg.reprob, re_mode="pixel", mean=self.mean,
                std=self.std, use_prefetcher=True, separate=True)
            rrc = next(t for t in primary.transforms if isinstance(t, RandomResizedCropAndInterpolation))
            self.scale, self.ratio = tuple(rrc.scale), tuple(rrc.ratio)
            self.interp = "bilinear"  # timm's default for supervised training
            self.secondary = secondary if len(secondary.transforms) else None
            _fix_posterize(secondary)
            if data_cfg.reprob > 0:
                self.erase = RandomErasing(data_cfg.reprob, mode="pixel", device="cpu")

    def _random_box(self, w: int, h: int) -> tuple[float, float, float, float]:
        from timm.data.transforms import RandomResizedCropAndInterpolation

        # timm's sampler reads only the size: an empty (0, h, w) tensor carries it without pixels
        top, left, ch, cw = RandomResizedCropAndInterpolation.get_params(torch.empty((0, h, w)), self.scale,
                                                                         self.ratio)
        return left, top, cw, ch

    def _center_box(self, w: int, h: int) -> tuple[float, float, float, float]:
        crop = self.size * min(w, h) / math.floor(self.size / self.crop_pct)  # = resize, then centre crop
        return (w - crop) / 2, (h - crop) / 2, crop, crop

    def box_of(self, w: int, h: int) -> tuple[float, float, float, float]:
        """The crop (left, top, width, height) of a w x h image: drawn in training, the centre crop in eval."""
        return self._center_box(w, h) if self.mode == "eval" else self._random_box(w, h)

    def draw_flip(self) -> bool:
        """Whether to flip (one draw in training, after the crop's; none in eval)."""
        return self.mode != "eval" and random.random() < self.hflip

    def __call__(self, sample: dict) -> np.ndarray:
        """(H, W, 3) uint8; raises BadSample(kind) for a sample to skip."""
        data = image_bytes(sample)
        try:
            arr, box = decode_for_crop(data, self.box_of, self.size)
        except Exception:  # noqa: BLE001  decoders raise many types for corrupt or truncated files
            raise BadSample("undecodable") from None
        arr = crop_resize(arr, box, self.size, self.interp, flip=self.draw_flip())
        if self.secondary is not None:
            arr = np.asarray(self.secondary(Image.fromarray(arr)))
        if self.erase is not None:
            arr = self._random_erase(arr)
        return arr

    def _random_erase(self, arr: np.ndarray) -> np.ndarray:
        """timm's RandomErasing works on normalised floats: normalise, erase, map back to uint8."""
        mean = torch.tensor(self.mean).view(3, 1, 1) * 255
        std = torch.tensor(self.std).view(3, 1, 1) * 255
        x = (torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() - mean) / std
        x = self.erase(x) * std + mean
        return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of normalize as (1, C, 1, 1) fp32 tensors on `device`, made once per device: built
    every call they cost two blocking host-to-device copies per step."""
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    return (1.0 / (std_t * 255)).to(device), (-mean_t / std_t).to(device)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) on the device -> float32 normalised with per-channel mean/std (given in 0..1)."""
    scale, shift = _affine(tuple(mean), tuple(std), images.device)
    return images.float().mul_(scale).add_(shift)  # x / (255 std) - mean / std, in place on one new tensor
