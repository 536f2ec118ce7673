"""What `vit-pretrain shards` reads: an image folder (sub-folder = class), a CSV/JSONL list of `path,label`,
Parquet files holding image bytes (the Hugging Face datasets layout), scikit-learn's `digits`, or
`synthetic:N`. Each source becomes a list of items: picklable tuples (kind, ref, label) that the writer's
workers turn into image bytes (`read_item`)."""
from __future__ import annotations

import csv
import functools
import io
import json

import fsspec
import numpy as np
from PIL import Image

from pretrain.errors import UserError

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm"}
SYNTHETIC_CLASSES = 10
SYNTHETIC_SIDE = 32
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm"}


SYNTHETIC_CLASSES = 10
SYNTHETIC_SIDE = 32


def _label_table(raw: list[str]) -> tuple[list[int], list[str]]:
    """Labels as given (ints or class names) -> (indices, class names); '' = unlabelled (-1)."""
    given = [r for r in raw if r != ""]
    if not given:
        return [-1] * len(raw), []
    if all(r.lstrip("-").isdigit() for r in given):
        ints = [int(r) if r != "" else -1 for r in raw]
        if any(i < 0 for i, r in zip(ints, raw) if r != ""):
            raise UserError(f"negative label {min(ints)} in the source list; labels must be >= 0")
        return ints, [str(i) for i in range(max(ints) + 1)]
    classes = sorted(set(given))
    pos = {c: i for i, c in enumerate(classes)}
    return [pos[r] if r != "" else -1 for r in raw], classes


def _folder_items(root: str) -> tuple[list[tuple], list[str]]:
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.isdir(path):
        raise UserError(f"source {root!r} is not a folder, a .csv/.jsonl/.parquet file, 'digits' or 'synthetic:N'")
    path = path.rstrip("/")
    files = sorted(p for p in fs.find(path) if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {root!r}")
    rels = [p[len(path) + 1:] for p in files]
    labelled = all("/" in r for r in rels)
    raw = [r.split("/", 1)[0] if labelled else "" for r in rels]
    if labelled:  # folder names are class names, even when they look like numbers
        classes = sorted(set(raw))
        pos = {c: i for i, c in enumerate(classes)}
        labels = [pos[r] for r in raw]
    else:
        labels, classes = [-1] * len(raw), []
    local = "file" in (fs.protocol if isinstance(fs.protocol, (list, tuple)) else [fs.protocol])
    urls = [p if local else fs.unstrip_protocol(p) for p in files]
    return [("file", u, lab) for u, lab in zip(urls, labels)], classes


def _list_items(source: str) -> tuple[list[tuple], list[str]]:
    base = source.rsplit("/", 1)[0] if "/" in source else "."
    try:
        with fsspec.open(source, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"source list not found: {source!r}") from None
    rows: list[tuple[str, str]] = []
    if source.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append((str(obj["path"]), "" if obj.get("label") is None else str(obj["label"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{source}:{n}: expected a JSON object with 'path' (and 'label')") from None
    else:
        for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
            if not row or not row[0].strip():
                continue
            if n == 1 and row[0].strip().lower() == "path":
                continue  # header
            rows.append((row[0].strip(), row[1].strip() if len(row) > 1 else ""))
    if not rows:
        raise UserError(f"source list {source!r} names no files")
    labels, classes = _label_table([r[1] for r in rows])
    paths = [p if ("://" in p or p.startswith("/")) else f"{base}/{p}" for p, _ in rows]
    return [("file", p, lab) for p, lab in zip(paths, labels)], classes


def _parquet_items(source: str) -> tuple[list[tuple], list[str]]:
    """Rows of Parquet files (one file or a glob), the Hugging Face datasets layout: an `image` column of
    {bytes, path} structs (or plain bytes) and an optional `label` column; ClassLabel names, when the
    file's `huggingface` metadata has them, become the class names."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet sources need pyarrow: pip install 'vit-pretrain[parquet]'") from None
    fs, path = fsspec.core.url_to_fs(source)
    files = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
    if not files or not all(fs.exists(f) for f in files):
        raise UserError(f"source {source!r}: no such Parquet file")
    items, raw, classes = [], [], None
    for f in files:
        url = fs.unstrip_protocol(f)
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            image_col = "image" if "image" in names else "img" if "img" in names else None
            if image_col is None:
                raise UserError(f"{url}: no 'image' column (columns: {', '.join(names)}); expected the Hugging "
                                "Face datasets layout, image.bytes + label")
            label_col = next((c for c in ("label", "labels", "cls") if c in names), None)
            hf = json.loads((pf.schema_arrow.metadata or {}).get(b"huggingface", b"{}"))
            feat = hf.get("info", {}).get("features", {}).get(label_col or "", {})
            if feat.get("names"):
                classes = classes or [str(c) for c in feat["names"]]
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                labs = (pf.read_row_group(rg, columns=[label_col]).column(0).to_pylist() if label_col
                        else [None] * n)
                items += [("parquet", (url, rg, i, image_col), -1) for i in range(n)]
                raw += ["" if v is None else str(v) for v in labs]
    if not items:
        raise UserError(f"source {source!r} holds no rows")
    if classes is not None:
        labels = [int(r) if r != "" else -1 for r in raw]
    else:
        labels, classes = _label_table(raw)
    return [(k, ref, lab) for (k, ref, _), lab in zip(items, labels)], classes


def source_items(source: str, seed: int) -> tuple[list[tuple], list[str]]:
    if source == "digits":
        from sklearn.datasets import load_digits

        target = load_digits().target
        return [("digits", i, int(t)) for i, t in enumerate(target)], [str(i) for i in range(10)]
    if source.startswith("synthetic:"):
        try:
            n = int(source.split(":", 1)[1])
            assert n > 0
        except (ValueError, AssertionError):
            raise UserError(f"source {source!r}: expected synthetic:N with N a positive integer") from None
        labels = np.random.default_rng([seed, 1]).integers(0, SYNTHETIC_CLASSES, n)
        return [("synthetic", (seed, i), int(labels[i])) for i in range(n)], [str(i) for i in range(SYNTHETIC_CLASSES)]
    if source.endswith((".csv", ".jsonl")):
        return _list_items(source)
    if source.endswith(".parquet"):
        return _parquet_items(source)
    return _folder_items(source)


_DIGITS = None


def generated_image(kind: str, ref, label: int) -> Image.Image | None:
    """The image of a `digits` or `synthetic` item (made, not read); None for items read from files."""
    global _DIGITS
    if kind == "digits":
        if _DIGITS is None:
            from sklearn.datasets import load_digits

            _DIGITS = load_digits().images  # (1797, 8, 8) floats in 0..16
        grey = np.clip(np.round(_DIGITS[ref] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L")
    if kind == "synthetic":
        return _synthetic_image(ref[0], ref[1], label)
    return None


def item_bytes(kind: str, ref) -> bytes:
    """The stored bytes of a file or Parquet item (raises what the file system or pyarrow raises)."""
    if kind == "parquet":
        return _parquet_cells(ref[0], ref[1], ref[3])[ref[2]]
    with fsspec.open(ref, "rb") as f:
        return f.read()


def _synthetic_image(seed: int, i: int, label: int) -> Image.Image:
    """Stripes whose angle and colour depend on the class, with random phase, frequency jitter and noise."""
    rng = np.random.default_rng([seed, 2, i])
    s = SYNTHETIC_SIDE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    angle = np.pi * label / SYNTHETIC_CLASSES + rng.normal(0, 0.05)
    freq = 3.0 + rng.uniform(-0.5, 0.5)
    wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
    hue = np.array([np.cos(label), np.cos(label + 2.1), np.cos(label + 4.2)], dtype=np.float32)
    img = 128 + 60 * wave[..., None] * hue + rng.normal(0, 12, (s, s, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=8)
def _parquet_cells(url: str, row_group: int, column: str) -> list:
    """One row group's image bytes (a worker keeps the last few: items arrive shuffled across the corpus)."""
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as f:
        col = pq.ParquetFile(f).read_row_group(row_group, columns=[column]).column(0).to_pylist()
    return [v.get("bytes") if isinstance(v, dict) else v for v in col]
