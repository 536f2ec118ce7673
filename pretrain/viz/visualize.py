"""`vit-pretrain visualize IMAGE... --weights W`: what a ViT looks at, one PNG per image.

Each picture holds the input cut into its numbered patches, the attention of the class token (or, for
a model that pools the mean of its patch tokens, of the mean patch query) in the last block, per head and
averaged over heads, the attention rollout over all blocks (Abnar & Zuidema, 2020), and, for an MAE run
directory (whose checkpoint keeps the decoder), the masked input and its reconstruction.

The image is prepared as eval prepares it (the exported model's input size, eval crop and normalisation);
the maps come from viz/attention.py, as TensorBoard's and the quickstart report's do. Drawing uses PIL (always installed), so the layout is exact to the pixel and `layout()` tells
where each panel lies.
"""
from __future__ import annotations

import argparse
import io
import os
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pretrain.engine.consolidate import consolidate, exported
from pretrain.errors import UserError
from pretrain.models.timm_spec import timm_spec
from pretrain.viz.attention import attention, pooled_query
from pretrain.weights import build_timm, load_exported

PANEL = 320  # panel side in pixels: a 14x14 grid keeps ~23 px per patch, room for its number
CAPTION = 22  # caption strip under each panel
GAP = 10
TITLE = 48  # two lines: image, weights and (for classifiers) the top predictions
HEAD_COLS = 6  # head panels per row
HEAT = dict(black="#000004", mid="#bc3754", white="#fcffa4")  # inferno's ends and middle, for ImageOps.colorize


@dataclass
class Loaded:
    """The model to look into: a timm ViT, the export meta its preprocessing comes from, and the MAE
    task (decoder included) when the weights are an MAE run directory."""
    encoder: torch.nn.Module
    meta: dict[str, Any]
    source: str
    mae: torch.nn.Module | None = None


# ----------------------------------------------------------------------------- weights


def load_model(weights: str | None, arch: str | None = None) -> Loaded:
    """An exported `.safetensors` (+ its JSON), a run directory, or (weights None) a random `arch`."""
    if weights is None:
        return _random_init(arch or "vit_base_patch16_224")
    if arch is not None:
        raise UserError(f"--arch {arch} is for a random init: the weights {weights!r} name their own architecture")
    fs, path = fsspec.core.url_to_fs(weights)
    if not fs.exists(path):
        raise UserError(f"weights not found: {weights!r} (an exported .safetensors file or a run directory)")
    if not fs.isdir(path):
        state, meta = load_exported(weights)
        return Loaded(build_timm(meta, state), meta, weights)
    module_state, tag = consolidate(weights)  # once: the encoder's export and, for MAE, the whole task
    state, meta = exported(weights, module_state, tag)
    if meta.get("task") != "mae":
        return Loaded(build_timm(meta, state), meta, weights)
    # an MAE run: rebuild the whole task from the run's config so the decoder can reconstruct
    from pretrain.config import load_config
    from pretrain.tasks import build_task

    task = build_task(load_config(f"{weights.rstrip('/')}/config.yaml"), 0)
    task.load_state_dict(module_state, strict=True)
    return Loaded(task.encoder.eval(), meta, weights, mae=task.eval())


def _random_init(arch: str) -> Loaded:
    from pretrain.models import create_model

    torch.manual_seed(0)
    encoder = create_model(arch, num_classes=0).eval()
    name, kwargs = timm_spec(arch, {"num_classes": 0})
    meta = {"timm_name": name, "timm_kwargs": kwargs, "arch": arch, "num_classes": 0, "class_names": [],
            "task": "", "mean": None, "std": None, "eval_crop_pct": None}
    return Loaded(encoder, meta, f"random init ({arch}, seed 0)")


# ----------------------------------------------------------------------------- image


def read_image(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"image not found: {url!r}") from None


def load_image(url: str, meta: dict[str, Any], data: bytes | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """(the eval crop as uint8 (S, S, 3), the normalised model input (1, C, S, S)) of any image file."""
    from pretrain.data.transforms import BadSample, Decoder
    from pretrain.evaluation.evaluate import eval_data

    d = eval_data(meta)
    data = read_image(url) if data is None else data
    try:
        # eval's own decoder: the resize to img_size / eval_crop_pct and the centre crop eval uses
        arr = Decoder("eval", meta["timm_kwargs"]["img_size"], d)({"jpg": data})
    except BadSample:
        raise UserError(f"{url}: not a readable image file (jpg, png, webp, bmp, tiff, ...)") from None
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()[None] / 255  # (1, 3, S, S)
    if meta["timm_kwargs"].get("in_chans", 3) == 1:
        x = x.mean(1, keepdim=True)
    mean = torch.tensor(d.mean).view(1, -1, 1, 1)
    std = torch.tensor(d.std).view(1, -1, 1, 1)
    return arr, (x - mean) / std


# ----------------------------------------------------------------------------- attention


@torch.no_grad()
def reconstruct(mae, x: torch.Tensor, mean, std, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MAE's masked input and reconstruction (visible patches pasted back) of x, as uint8 (S, S, 3)."""
    noise = torch.rand(1, mae.num_patches, generator=torch.Generator().manual_seed(seed))
    masked, recon = mae.reconstruct(x, noise)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)

    def to_uint8(t: torch.Tensor) -> np.ndarray:
        t = (t.float() * s + m).clamp(0, 1)[0]
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        return (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    return to_uint8(masked), to_uint8(recon)


# ----------------------------------------------------------------------------- drawing


def panel_names(n_heads: int, mae: bool) -> tuple[list[str], list[str]]:
    """(top-row panels, head panels) in drawing order."""
    top = ["input", "rollout", "mean"] + (["masked", "reconstruction"] if mae else [])
    return top, [f"head_{i}" for i in range(n_heads)]


def layout(n_heads: int, mae: bool) -> tuple[int, int, dict[str, tuple[int, int, int, int]]]:
    """(width, height, {panel: (left, top, right, bottom)}) of the picture, in pixels."""
    top, heads = panel_names(n_heads, mae)
    cols = max(len(top), min(n_heads, HEAD_COLS))
    cell_w, cell_h = PANEL + GAP, PANEL + CAPTION + GAP
    boxes = {}
    for i, name in enumerate(top):
        boxes[name] = (GAP + i * cell_w, TITLE, GAP + i * cell_w + PANEL, TITLE + PANEL)
    y0 = TITLE + cell_h + CAPTION  # a section caption above the heads
    for i, name in enumerate(heads):
        r, c = divmod(i, cols)
        x, y = GAP + c * cell_w, y0 + r * cell_h
        boxes[name] = (x, y, x + PANEL, y + PANEL)
    rows = -(-n_heads // cols)
    return GAP + cols * cell_w, y0 + rows * cell_h, boxes


def font(size: int):
    return ImageFont.load_default(size=size)


def scaled(arr: np.ndarray, size: int = PANEL) -> Image.Image:
    """The image at panel size: small inputs (digits at 32 px) as sharp pixels, larger ones smoothly."""
    resample = Image.Resampling.NEAREST if 2 * max(arr.shape[:2]) <= size else Image.Resampling.BICUBIC
    return Image.fromarray(arr).convert("RGB").resize((size, size), resample)


def heat(image: Image.Image, amap: torch.Tensor) -> Image.Image:
    """A (gh, gw) map, scaled to [0, 1], coloured and laid over the image; one flat block per patch."""
    a = amap.float()
    a = (a - a.min()) / (a.max() - a.min() + 1e-12)
    grey = Image.fromarray((a.numpy() * 255).round().astype(np.uint8)).resize(image.size, Image.Resampling.NEAREST)
    return Image.blend(image, ImageOps.colorize(grey, **HEAT), 0.65)


def patch_grid(image: Image.Image, gh: int, gw: int, numbers: bool = True) -> Image.Image:
    """The image with its patch grid and (numbers) each patch's index (raster order: token index - prefix)."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width, height = out.size
    cw, ch = width / gw, height / gh
    for i in range(1, gw):
        draw.line([(i * cw, 0), (i * cw, height)], fill=(255, 255, 255), width=1)
    for j in range(1, gh):
        draw.line([(0, j * ch), (width, j * ch)], fill=(255, 255, 255), width=1)
    size = int(min(cw, ch) * 0.38)
    if numbers and size >= 6:  # below that the numbers are unreadable; the grid alone still shows the patches
        small = font(min(size, 16))
        for j in range(gh):
            for i in range(gw):
                draw.text((i * cw + 2, j * ch + 1), str(j * gw + i), font=small, fill=(255, 255, 255),
                          stroke_width=1, stroke_fill=(0, 0, 0))
    return out


def save_png(picture: Image.Image, path: str) -> None:
    """Write a picture to any fsspec URL (PIL writes to the buffer, fsspec moves the bytes)."""
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    with fsspec.open(path, "wb") as f:
        f.write(buf.getvalue())


def _top_classes(logits: torch.Tensor | None, names: list[str], k: int = 3) -> str:
    if logits is None:
        return ""
    p = logits.float().softmax(-1)
    top = p.topk(min(k, p.numel()))
    label = [names[i] if i < len(names) else str(i) for i in top.indices.tolist()]
    return "   predicted: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(label, top.values.tolist()))


def draw(name: str, loaded: Loaded, crop: np.ndarray, maps: dict[str, torch.Tensor],
         mae_images: tuple[np.ndarray, np.ndarray] | None) -> Image.Image:
    """The picture: title, top row (input + grid, rollout, mean of heads, MAE panels), then each head."""
    enc = loaded.encoder
    n_heads = maps["heads"].shape[0]
    width, height, boxes = layout(n_heads, mae_images is not None)
    gh, gw = enc.patch_embed.grid_size
    p = enc.patch_embed.patch_size[0]
    depth = len(enc.blocks)
    query = pooled_query(enc)
    image = scaled(crop)
    panels = {
        "input": (patch_grid(image, gh, gw), f"input {crop.shape[1]}x{crop.shape[0]}: {gh}x{gw} patches of {p} px"),
        "rollout": (heat(image, maps["rollout"]), f"attention rollout over {depth} blocks"),
        "mean": (heat(image, maps["mean"]), f"last block, mean of {n_heads} heads"),
    }
    if mae_images is not None:
        ratio = loaded.mae.mask_ratio
        panels["masked"] = (scaled(mae_images[0]), f"MAE input, {ratio:.0%} of patches hidden")
        panels["reconstruction"] = (scaled(mae_images[1]), "MAE reconstruction + visible patches")
    for i in range(n_heads):
        panels[f"head_{i}"] = (heat(image, maps["heads"][i]), f"head {i}")

    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    title, small = font(15), font(13)
    pen.text((GAP, 6), f"{name}   {loaded.meta.get('arch') or loaded.meta['timm_name']}"
             f"{_top_classes(maps.get('logits'), loaded.meta.get('class_names') or [])}", font=title, fill=(0, 0, 0))
    pen.text((GAP, 26), f"weights: {loaded.source}", font=small, fill=(80, 80, 80))
    for key, (img, caption) in panels.items():
        left, top, _, bottom = boxes[key]
        canvas.paste(img, (left, top))
        pen.text((left, bottom + 4), caption, font=small, fill=(0, 0, 0))
    first_head = boxes["head_0"]
    pen.text((GAP, first_head[1] - CAPTION + 2), f"last block ({depth - 1}): attention of the {query} "
             f"to each patch, per head (each map scaled to its own range)", font=small, fill=(0, 0, 0))
    return canvas


# ----------------------------------------------------------------------------- command


def visualize(images: list[str], weights: str | None, out_dir: str, arch: str | None = None) -> list[str]:
    """Write one PNG per image into out_dir; returns their paths."""
    files = [read_image(url) for url in images]  # a wrong path fails before the model loads
    loaded = load_model(weights, arch)
    mean = loaded.meta.get("mean")
    std = loaded.meta.get("std")
    written: list[str] = []
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    inputs = [(url, *load_image(url, loaded.meta, data)) for url, data in zip(images, files)]
    for url, crop, x in inputs:
        maps = attention(loaded.encoder, x)
        mae_images = None
        if loaded.mae is not None:
            from pretrain.evaluation.evaluate import eval_data

            d = eval_data(loaded.meta)
            mae_images = reconstruct(loaded.mae, x, mean or d.mean, std or d.std)
        picture = draw(os.path.basename(url), loaded, crop, maps, mae_images)
        stem = os.path.splitext(os.path.basename(url.rstrip("/")))[0] or "image"
        name, n = f"{stem}.png", 1
        while f"{out_dir.rstrip('/')}/{name}" in written:  # two inputs with one file name
            n += 1
            name = f"{stem}_{n}.png"
        path = f"{out_dir.rstrip('/')}/{name}"
        save_png(picture, path)
        written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files (any size, any format PIL reads; any fsspec URL)")
    parser.add_argument("--weights", default=None,
                        help="exported .safetensors (its .json next to it) or a run directory (MAE runs add the "
                             "reconstruction); omit for a random init of --arch")
    parser.add_argument("--arch", default=None, help="architecture of the random init when --weights is omitted "
                                                     "(default vit_base_patch16_224)")
    parser.add_argument("--out", default="visualize", help="output folder (default ./visualize)")


def run(args: argparse.Namespace) -> int:
    for path in visualize(args.images, args.weights, args.out, args.arch):
        print(path)
    return 0
