"""One picture of what a set of runs learned: loss curves, MAE reconstructions, attention with predictions.

The quickstart ends by drawing it (`report.png`). Top to bottom: the training loss of every run against
its step (from each run's `metrics.jsonl`); MAE reconstructions of held-out images (original, masked
input, the decoder's reconstruction), from an MAE run directory, whose checkpoint keeps the decoder; and
where a classifier looks on the same held-out images (input with its patch grid, attention rollout, mean
last-block attention) under its prediction. Held-out images come through the eval stream, so they are
prepared exactly as evaluation prepares them. Drawn with PIL from `visualize`'s pieces; `layout()` says
where every panel lies, so a test reads the picture back box by box.
"""
from __future__ import annotations

import json
import math

import fsspec
import numpy as np
import torch
from PIL import Image, ImageDraw

from pretrain.errors import UserError
from pretrain.viz.attention import attention, pooled_query
from pretrain.viz.visualize import Loaded, font, heat, load_model, patch_grid, reconstruct, save_png, scaled

CELL = 128  # an image panel: a 32-px digit at 4x, one sharp block per pixel
GAP = 10
LABEL_W = 130  # row labels left of the image grids
TITLE = 44  # two lines: title, sources
HEADER = 26  # a section heading
COL_HEAD = 18  # a caption above each column of images
PLOT_H = 220
N_IMAGES = 10  # held-out images per section: the first of each class, one column each
RECON_ROWS = ("original", "masked", "reconstruction")
ATTN_ROWS = ("input", "rollout", "mean")
INK, GREY, LINE = (0, 0, 0), (110, 110, 110), (31, 119, 180)


def layout(runs: list[str], n_images: int = N_IMAGES) -> tuple[int, int, dict[str, tuple[int, int, int, int]]]:
    """(width, height, {panel: (left, top, right, bottom)}) of the report, in pixels. Panels: `loss/<run>`,
    `recon/<i>/<row>` for RECON_ROWS and `attn/<i>/<row>` for ATTN_ROWS, i the held-out image's column."""
    width = LABEL_W + n_images * (CELL + GAP) + GAP
    boxes = {}
    plot_w = (width - GAP * (len(runs) + 1)) // max(len(runs), 1)
    y = TITLE + HEADER
    for i, run in enumerate(runs):
        x = GAP + i * (plot_w + GAP)
        boxes[f"loss/{run}"] = (x, y, x + plot_w, y + PLOT_H)
    y += PLOT_H + GAP
    for section, rows in (("recon", RECON_ROWS), ("attn", ATTN_ROWS)):
        y += HEADER + COL_HEAD
        for r, row in enumerate(rows):
            for i in range(n_images):
                x, top = LABEL_W + i * (CELL + GAP), y + r * (CELL + GAP)
                boxes[f"{section}/{i}/{row}"] = (x, top, x + CELL, top + CELL)
        y += len(rows) * (CELL + GAP)
    return width, y, boxes


# ----------------------------------------------------------------------------- loss curves


def losses(run_dir: str) -> list[tuple[int, float]]:
    """(step, train loss) of every logging step of a run, in step order; a redone step (resume) keeps its
    last row, as the run's own resume does."""
    by_step: dict[int, float] = {}
    with fsspec.open(f"{run_dir.rstrip('/')}/metrics.jsonl", "r") as f:
        for line in f:
            row = json.loads(line)
            if row.get("loss") is not None:  # eval/k-NN rows carry prefixed keys; a skipped window is null
                by_step[row["step"]] = row["loss"]
    return sorted(by_step.items())


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round values (1, 2, 2.5 or 5 x 10^k apart, at most n intervals) from at or below lo to at or above hi:
    matplotlib's MaxNLocator in miniature (matplotlib is not a dependency)."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    mag = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 2.5, 5, 10, 20):  # the finest step that covers [lo, hi] in n intervals
        step = m * mag
        first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
        if last - first <= n:
            break
    return [round(k * step, 12) for k in range(first, last + 1)]


def plot(points: list[tuple[int, float]], size: tuple[int, int], title: str) -> Image.Image:
    """A line plot of (step, loss) with ticked axes, at `size` pixels."""
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    pen = ImageDraw.Draw(img)
    small = font(11)
    pen.text((4, 2), title, font=font(13), fill=INK)
    left, top, right, bottom = 46, 24, w - 10, h - 32  # the axes' box, room for tick labels left and below
    pen.rectangle((left, top, right, bottom), outline=GREY)
    pen.text(((left + right) // 2 - 12, h - 15), "step", font=small, fill=GREY)
    if not points:
        pen.text((left + 8, (top + bottom) // 2), "no logged steps", font=small, fill=GREY)
        return img
    steps, values = zip(*points)
    xt, yt = ticks(0, max(steps)), ticks(min(values), max(values))

    def px(step: float, value: float) -> tuple[float, float]:
        return (left + (step - xt[0]) / (xt[-1] - xt[0]) * (right - left),
                bottom - (value - yt[0]) / (yt[-1] - yt[0]) * (bottom - top))

    for t in xt:
        x, _ = px(t, yt[0])
        pen.line([(x, bottom), (x, bottom + 4)], fill=GREY)
        pen.text((x, bottom + 6), f"{t:g}", font=small, fill=GREY, anchor="ma")
    for t in yt:
        _, y = px(xt[0], t)
        pen.line([(left - 4, y), (left, y)], fill=GREY)
        pen.text((left - 6, y), f"{t:g}", font=small, fill=GREY, anchor="rm")
    xy = [px(s, v) for s, v in points]
    if len(xy) > 1:
        pen.line(xy, fill=LINE, width=2)
    for x, y in xy if len(xy) <= 30 else xy[-1:]:  # dots where few points (or one) would hide the line
        pen.ellipse((x - 2, y - 2, x + 2, y + 2), fill=LINE)
    return img


# ----------------------------------------------------------------------------- held-out images


def held_out_images(val: str, meta: dict, n: int) -> tuple[torch.Tensor, list[int], list[str]]:
    """The first held-out image of each class, up to n, in class order: (uint8 (n, C, S, S) as eval
    prepares them for this model, labels, the split's class names)."""
    from pretrain.evaluation.evaluate import eval_stream

    stream = eval_stream(val, meta, batch_size=64, workers=0)
    first: dict[int, torch.Tensor] = {}
    for images, labels in stream:
        for img, label in zip(images, labels.tolist()):
            first.setdefault(label, img)
        if len(first) >= n:
            break
    chosen = sorted(first)[:n]
    return torch.stack([first[c] for c in chosen]), chosen, list(stream.index.classes)


def _inputs(loaded: Loaded, images: torch.Tensor) -> tuple[torch.Tensor, tuple, tuple]:
    """(normalised model inputs (n, C, S, S), mean, std) of eval-prepared uint8 images."""
    from pretrain.data import normalize
    from pretrain.evaluation.evaluate import eval_data

    d = eval_data(loaded.meta)
    return normalize(images, d.mean, d.std), d.mean, d.std


def _rgb(img: torch.Tensor) -> np.ndarray:
    """uint8 (C, S, S) -> (S, S, 3)."""
    return img.expand(3, -1, -1).permute(1, 2, 0).numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def _name(names: list[str], label: int) -> str:
    return names[label] if 0 <= label < len(names) else str(label)


# ----------------------------------------------------------------------------- the picture


class Sheet:
    """The canvas, a pen and the layout's boxes: what every section draws with."""

    def __init__(self, runs: list[str], n_images: int):
        width, height, self.boxes = layout(runs, n_images)
        self.image = Image.new("RGB", (width, height), (255, 255, 255))
        self.pen = ImageDraw.Draw(self.image)

    def paste(self, key: str, img: Image.Image) -> None:
        self.image.paste(img, self.boxes[key][:2])

    def caption(self, key: str, line: str, fill=INK) -> None:
        """A line just above the panel `key`."""
        self.pen.text(self.boxes[key][:2], line, font=font(12), fill=fill, anchor="ld")

    def heading(self, section: str, line: str, col_head: str, rows: dict[str, str]) -> None:
        """A section's heading, what its column captions mean, and a label left of each row."""
        top = self.boxes[f"{section}/0/{next(iter(rows))}"][1]
        self.pen.text((GAP, top - COL_HEAD - HEADER + 6), line, font=font(14), fill=INK)
        self.pen.text((GAP, top - COL_HEAD + 2), col_head, font=font(12), fill=GREY)
        for row, label in rows.items():
            _, top, _, bottom = self.boxes[f"{section}/0/{row}"]
            self.pen.text((GAP, (top + bottom) // 2), label, font=font(13), fill=INK, anchor="lm")


def draw_losses(sheet: Sheet, curves: dict[str, list[tuple[int, float]]]) -> None:
    sheet.pen.text((GAP, TITLE + 6), "training loss per run (train split, metrics.jsonl)", font=font(14), fill=INK)
    for run, points in curves.items():
        left, top, right, bottom = sheet.boxes[f"loss/{run}"]
        first_last = f": {points[0][1]:.3g} -> {points[-1][1]:.3g}" if points else ""
        sheet.paste(f"loss/{run}", plot(points, (right - left, bottom - top), f"{run}{first_last}"))


def draw_reconstructions(sheet: Sheet, mae: Loaded, val: str, n_images: int) -> None:
    """Original, masked input and reconstruction of each held-out image, a different mask each."""
    images, labels, names = held_out_images(val, mae.meta, n_images)
    x, mean, std = _inputs(mae, images)
    sheet.heading("recon", f"MAE reconstructions of held-out images ({mae.mae.mask_ratio:.0%} of patches hidden, "
                  "a different random mask each)", "label",
                  {"original": "original", "masked": "MAE input", "reconstruction": "reconstruction"})
    for i, label in enumerate(labels):
        masked, recon = reconstruct(mae.mae, x[i:i + 1], mean, std, seed=i)
        for row, arr in zip(RECON_ROWS, (_rgb(images[i]), masked, recon)):
            sheet.paste(f"recon/{i}/{row}", scaled(arr, CELL))
        sheet.caption(f"recon/{i}/original", _name(names, label))


def draw_attention(sheet: Sheet, classifier: Loaded, val: str, n_images: int) -> None:
    """Where the classifier looks on each held-out image (patch grid, rollout, last-block mean), and what
    it predicts (red where wrong)."""
    enc = classifier.encoder
    images, labels, names = held_out_images(val, classifier.meta, n_images)
    x, _, _ = _inputs(classifier, images)
    gh, gw = enc.patch_embed.grid_size
    sheet.heading("attn", f"where the classifier looks on held-out images ({pooled_query(enc)} attention)",
                  "label: predicted (p)", {"input": f"input, {gh}x{gw} patches",
                                           "rollout": f"rollout, {len(enc.blocks)} blocks",
                                           "mean": "last block, mean"})
    for i, label in enumerate(labels):
        maps = attention(enc, x[i:i + 1])
        image = scaled(_rgb(images[i]), CELL)
        sheet.paste(f"attn/{i}/input", patch_grid(image, gh, gw, numbers=False))
        sheet.paste(f"attn/{i}/rollout", heat(image, maps["rollout"]))
        sheet.paste(f"attn/{i}/mean", heat(image, maps["mean"]))
        caption, right = _name(names, label), True
        if maps["logits"] is not None:  # an encoder without a head draws no prediction
            p = maps["logits"].float().softmax(-1)
            pred = int(p.argmax())
            caption, right = f"{caption}: {_name(names, pred)} ({p[pred]:.2f})", pred == label
        sheet.caption(f"attn/{i}/input", caption, INK if right else (200, 0, 0))


def write_report(path: str, *, runs: dict[str, str], mae_run: str, classifier: str, val: str,
                 title: str = "report") -> str:
    """Draw the report and write it as a PNG to `path` (any fsspec URL); -> path.
    runs: {name: run directory} for the loss curves; mae_run: an MAE run directory (its decoder draws the
    reconstructions); classifier: an exported classifier file or run directory; val: held-out shards."""
    curves = {name: losses(run_dir) for name, run_dir in runs.items()}
    mae = load_model(mae_run)
    if mae.mae is None:
        raise UserError(f"{mae_run} is not an MAE run directory: the reconstructions need its decoder "
                        "(an exported MAE file keeps only the encoder)")
    clf = load_model(classifier)
    sheet = Sheet(list(curves), N_IMAGES)
    sheet.pen.text((GAP, 6), title, font=font(16), fill=INK)
    sheet.pen.text((GAP, 26), f"MAE: {mae_run}   classifier: {classifier}   held-out: {val}", font=font(12),
                   fill=GREY)
    draw_losses(sheet, curves)
    draw_reconstructions(sheet, mae, val, N_IMAGES)
    draw_attention(sheet, clf, val, N_IMAGES)
    save_png(sheet.image, path)
    return path
