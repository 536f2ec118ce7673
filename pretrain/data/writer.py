"""`vit-pretrain shards SOURCE --out DIR`: WebDataset shards from an image folder, a CSV/JSONL list,
Parquet files holding image bytes (the Hugging Face datasets layout), scikit-learn's `digits`, or `synthetic:N`.

Writes `DIR/<split>-NNNNNN.tar` (samples `<key>.jpg|png` + `<key>.cls`), `DIR/<split>.json` (our index:
shards, per-shard counts, class names, how it was made) and `DIR/_info.json` (timm's WebDataset reader
layout, so `timm.data.create_dataset('wds/...', root=DIR)` reads the same shards). Samples are shuffled
with `--seed` before splitting and sharding, so every shard mixes all classes. Unreadable source files
are reported by name and skipped.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import multiprocessing
import sys
from typing import Optional

import fsspec
import numpy as np
from PIL import Image

from pretrain.data.index import remote_error
from pretrain.data.sources import generated_image, item_bytes, source_items
from pretrain.errors import UserError
from pretrain.fs import is_local

log = logging.getLogger(__name__)

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as-is; others are re-encoded


# ----------------------------------------------------------------------------- per-item work (in workers)


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, fmt, optimize=False)
    return buf.getvalue()


def _prepare(job: tuple) -> tuple[Optional[str], Optional[bytes], str]:
    """(ext, payload, '') for a good item, or (None, None, reason) for an unreadable one."""
    (kind, ref, label), max_side, quality = job
    generated = generated_image(kind, ref, label)
    if generated is not None:  # digits as lossless grey PNG, synthetic stripes as JPEG
        fmt = "PNG" if generated.mode == "L" else "JPEG"
        return ("png" if fmt == "PNG" else "jpg"), _encode(generated, fmt, quality), ""
    try:
        data = item_bytes(kind, ref)
    except Exception as e:  # noqa: BLE001  reported and skipped, by name
        return None, None, f"cannot read ({type(e).__name__}: {e})"
    if not data:
        return None, None, "empty file"
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if fmt == "JPEG":
            img.draft("RGB", (64, 64))  # a cheap full-file decode that still catches truncation
        img.load()
        img = Image.open(io.BytesIO(data))
        too_big = max_side > 0 and max(img.size) > max_side
        if fmt in KEEP_FORMATS and not too_big:
            return KEEP_FORMATS[fmt], data, ""
        img.load()
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        if too_big:
            img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        out_fmt = "PNG" if fmt == "PNG" else "JPEG"
        return ("png" if out_fmt == "PNG" else "jpg"), _encode(img, out_fmt, quality), ""
    except Exception as e:  # noqa: BLE001  any decoder error: reported and skipped
        return None, None, f"not a readable image ({type(e).__name__}: {e})"


# ----------------------------------------------------------------------------- writing


TAR_MTIME = 0
"""Member time stamps in the tars: fixed, so the same source and options give the same bytes (a resumed
write equals a clean one); an integer, so that `tarfile` writes a plain header only (a float such as 0.0
takes a pax record for every member: three 512-byte blocks instead of one)."""
PARTIAL = ".partial"
"""A shard is written as NAME.partial and renamed to NAME once closed: a NAME that exists is finished."""


def _finished_shards(split: str, out_dir: str, fs) -> tuple[list[str], list[int], int]:
    """Shards a previous run finished (renamed from .partial), in order: (names, counts, next item index).
    Each is read back (tar headers only); the last key's item index says where the next shard starts."""
    from pretrain.data.tario import ShardCursor

    names, counts, nxt = [], [], 0
    while fs.exists(f"{out_dir}/{split}-{len(names):06d}.tar"):
        name = f"{split}-{len(names):06d}.tar"
        c = ShardCursor(fs.unstrip_protocol(f"{out_dir}/{name}"))
        try:
            keys = []
            while (got := c._take_sample(read=False)) is not None:
                keys.append(got[0])
        finally:
            c.close()
        if c.broken or not keys:
            break  # not ours or damaged: rewritten from here
        names.append(name)
        counts.append(len(keys))
        nxt = int(keys[-1].rsplit("_", 1)[1]) + 1
    return names, counts, nxt


def _progress_bar(split: str, total: int, done: int, every_s: float):
    """tqdm's count, rate and ETA of a split on stderr, redrawn at most every `every_s` seconds (0: 1 s on a
    terminal, 30 s otherwise, e.g. a job's log file)."""
    from tqdm import tqdm

    every_s = every_s or (1.0 if sys.stderr.isatty() else 30.0)
    return tqdm(total=total, initial=done, desc=f"shards {split}", unit="img", file=sys.stderr, mininterval=every_s,
                maxinterval=max(every_s, 10.0), dynamic_ncols=True,
                bar_format="{desc}: {n_fmt}/{total_fmt} images ({percentage:.1f}%), {rate_fmt}, ETA {remaining}"
                           "{postfix}")


def _write_split(split: str, jobs: list[tuple], out_dir: str, fs, pool, *, samples_per_shard: int,
                 max_shard_bytes: int, skipped: list, progress_s: float) -> dict:
    from tqdm import tqdm
    from webdataset import TarWriter

    shards, counts, first = _finished_shards(split, out_dir, fs)
    resumed = len(shards)
    n_skipped = first - sum(counts)  # items before `first` that are in no finished shard were skipped
    writer = stream = None
    size = 0
    bar = _progress_bar(split, len(jobs), first, progress_s)

    def note():  # the bar's tail: shards closed so far, items skipped
        bar.set_postfix_str(f"{len(shards) - (writer is not None)} shards written, {n_skipped} skipped", refresh=False)

    def close():
        if writer is not None:
            writer.close()
            stream.close()
            fs.mv(f"{out_dir}/{shards[-1]}{PARTIAL}", f"{out_dir}/{shards[-1]}")

    todo = jobs[first:]
    results = pool.imap(_prepare, todo, chunksize=16) if pool is not None else map(_prepare, todo)
    for n, (job, (ext, payload, reason)) in enumerate(zip(todo, results), first):
        (kind, ref, label) = job[0]
        bar.update()
        if ext is None:
            skipped.append((str(ref), reason))
            n_skipped += 1
            tqdm.write(f"skipped {ref}: {reason}", file=sys.stderr)
            note()
            continue
        if writer is None or counts[-1] >= samples_per_shard or (
                max_shard_bytes and size + len(payload) > max_shard_bytes and counts[-1] > 0):
            close()
            name = f"{split}-{len(shards):06d}.tar"
            stream = fs.open(f"{out_dir}/{name}{PARTIAL}", "wb")
            writer = TarWriter(stream, encoder=False, mtime=TAR_MTIME)
            shards.append(name)
            counts.append(0)
            size = 0
            note()
        sample = {"__key__": f"{split}_{n:08d}", ext: payload}
        if label >= 0:
            sample["cls"] = str(label).encode()
        writer.write(sample)
        counts[-1] += 1
        size += len(payload) + 1536  # payload + headers, roughly
    close()
    seconds, read = bar.format_dict["elapsed"], len(jobs) - first
    bar.close()
    again = f"; {resumed} finished shards kept from an earlier run" if resumed else ""
    print(f"shards {split}: {read:,} images read in {tqdm.format_interval(seconds)} ({read / max(seconds, 1e-9):,.0f} "
          f"img/s), {len(shards)} shards, {n_skipped} skipped{again}", file=sys.stderr, flush=True)
    return {"shards": shards, "counts": counts, "num_samples": sum(counts), "skipped": n_skipped}


CLAIM = "_writing.json"
"""Written first with the options, removed last: a rerun resumes only a write made with the same options."""


def _claim(fs, root: str, out: str, options: dict) -> None:
    for name in (CLAIM, "train.json"):
        if not fs.exists(f"{root}/{name}"):
            continue
        with fs.open(f"{root}/{name}", "r") as f:
            had = json.load(f)
        had = had.get("made_by", had)
        diff = [k for k in options if had.get(k) != options[k]]
        if diff:
            k = diff[0]
            raise UserError(f"{out} holds shards written with --{k.replace('_', '-')}={had.get(k)!r}, not "
                            f"{options[k]!r}; rerun with the same options to resume, or choose another --out")
    with fs.open(f"{root}/{CLAIM}", "w") as f:
        json.dump(options, f, indent=1)


def _check_options(samples_per_shard: int, val_fraction: float, quality: int) -> None:
    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {samples_per_shard}: must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality {quality}: must be in 1..100")


def _splits(items: list, seed: int, val_fraction: float) -> dict[str, list]:
    """{"train": ..., "val": ...} of the items shuffled with `seed` ("val" only when it holds any)."""
    order = np.random.default_rng([seed, 0]).permutation(len(items))
    items = [items[i] for i in order]
    n_val = int(round(len(items) * val_fraction))
    return {"train": items[n_val:], **({"val": items[:n_val]} if n_val else {})}


def _shard_bytes(fs, root: str, shards: list[str]) -> list[int]:
    """Bytes of each shard, as listed (what bounds a shuffle block in bytes)."""
    sizes = {e["name"].rsplit("/", 1)[-1]: e["size"] for e in fs.ls(root, detail=True)}
    return [int(sizes[name]) for name in shards]


def write_shards(source: str, out_dir: str, *, samples_per_shard: int = 5000, max_shard_bytes: int = 0,
                 val_fraction: float = 0.0, seed: int = 0, max_side: int = 0, quality: int = 90,
                 workers: int = 1, progress_s: float = 0.0) -> dict:
    """Write shards + indexes; returns {"out", "classes", "splits": {name: {index, shards, counts,
    num_samples, bytes}}, "skipped": [(source, reason)] of this run, "num_skipped"}.

    Resumable: shards are written under a temporary name and renamed when closed, so a rerun with the same
    options keeps every finished shard and writes only the rest; the result equals an uninterrupted write.
    `progress_s`: seconds between progress updates on stderr (0: 1 s on a terminal, 30 s otherwise)."""
    _check_options(samples_per_shard, val_fraction, quality)
    items, classes = source_items(source, seed)
    splits = _splits(items, seed, val_fraction)
    fs, root = fsspec.core.url_to_fs(out_dir)
    if is_local(fs):  # object stores have no folders; s3fs's makedirs would create a mistyped bucket
        fs.makedirs(root, exist_ok=True)
    out = out_dir.rstrip("/")
    skipped: list = []
    options = {"source": source, "samples_per_shard": samples_per_shard, "max_shard_bytes": max_shard_bytes,
               "val_fraction": val_fraction, "seed": seed, "max_side": max_side, "quality": quality}
    made_by = {**options, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    n_skipped = 0
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    result = {"out": out, "classes": classes, "splits": {}, "skipped": skipped}
    info = {"name": out.rsplit("/", 1)[-1], "splits": {}}
    try:
        _claim(fs, root, out, options)
        for split, its in splits.items():
            got = _write_split(split, [(it, max_side, quality) for it in its], root, fs, pool,
                               samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes,
                               skipped=skipped, progress_s=progress_s)
            n_skipped += got.pop("skipped")
            got["bytes"] = _shard_bytes(fs, root, got["shards"])
            with fs.open(f"{root}/{split}.json", "w") as f:
                json.dump({"split": split, **got, "classes": classes, "made_by": {**made_by, "skipped": n_skipped}},
                          f, indent=1)
            info["splits"][split] = {"name": split, "num_samples": got["num_samples"],
                                     "filenames": got["shards"], "shard_lengths": got["counts"]}
            result["splits"][split] = {"index": f"{out}/{split}.json", **got}
        result["num_skipped"] = n_skipped
    except Exception as e:  # noqa: BLE001  an object store's errors are many types; named ones become one line
        hint = remote_error(out, e)
        if hint:
            raise UserError(hint) from None
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    with fs.open(f"{root}/_info.json", "w") as f:
        json.dump(info, f, indent=1)
    fs.rm(f"{root}/{CLAIM}")
    if not any(s["num_samples"] for s in result["splits"].values()):
        raise UserError(f"no readable images in {source!r} ({len(skipped)} skipped)")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="image folder (sub-folder = class), .csv/.jsonl of path,label, "
                                       ".parquet file or glob (image.bytes + label), 'digits', or 'synthetic:N'")
    parser.add_argument("--out", required=True, help="output folder (any fsspec URL)")
    parser.add_argument("--samples-per-shard", type=int, default=5000, help="samples per tar shard")
    parser.add_argument("--max-shard-bytes", type=float, default=0,
                        help="also start a new shard before this many bytes (e.g. 1e9; 0 = no limit)")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="held-out fraction written as 'val'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle and the split")
    parser.add_argument("--max-side", type=int, default=0,
                        help="re-encode images whose longer side exceeds this (0 = keep as is)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--workers", type=int, default=1, help="processes reading and re-encoding images")
    parser.add_argument("--progress-seconds", type=float, default=0,
                        help="seconds between progress lines on stderr (0: 1 on a terminal, 30 otherwise)")


def run(args: argparse.Namespace) -> int:
    res = write_shards(args.source, args.out, samples_per_shard=args.samples_per_shard,
                       max_shard_bytes=int(args.max_shard_bytes), val_fraction=args.val_fraction,
                       seed=args.seed, max_side=args.max_side, quality=args.quality, workers=args.workers,
                       progress_s=args.progress_seconds)
    for split, s in res["splits"].items():
        print(f"{split}: {s['num_samples']} samples in {len(s['shards'])} shards -> {s['index']}")
    print(f"classes: {len(res['classes'])}; skipped: {res['num_skipped']}")
    return 0
