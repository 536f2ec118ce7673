"""`vit-pretrain bench loader`: decode + augment the same JPEGs two ways, in one run.

Ours: the train stream (supervised transforms: RandomResizedCrop + flip, uint8 batches, normalised
afterwards in the main process as the trainer does on its device) reading tar shards. Baseline:
torchvision `ImageFolder` + RandomResizedCrop / flip / ToTensor / Normalize in a DataLoader with the same
workers, batch and output size. Peers, uint8 out like ours: webdataset's own pipeline and timm's WebDataset
reader on the same shards (torchvision v2 crop + flip). Also a single-core decode-only ceiling. Every
pipeline keeps its workers across passes (persistent workers), as the train stream does across epochs.
Images: crops of the two photographs that ship in scikit-learn (`sklearn.datasets.load_sample_images`,
640x427), re-encoded at ImageNet-like sizes (500x375 or 375x500, JPEG quality 90).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("loader")
    g.add_argument("--loader-images", type=int, default=768, help="JPEGs to decode per pass")
    g.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers (both pipelines)")
    g.add_argument("--loader-batch", type=int, default=64, help="batch size (both pipelines)")
    g.add_argument("--loader-size", type=int, default=224, help="output side in pixels (both pipelines)")
    g.add_argument("--loader-passes", type=int, default=3,
                   help="timed passes per pipeline, interleaved (the median is reported)")
    g.add_argument("--loader-dir", default="", help="keep the generated photos and shards here")


def make_photos(root: str, n: int, seed: int = 0) -> str:
    """An ImageFolder (class = source photo) of n JPEGs, 500x375 or 375x500, quality 90."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images()
    srcs = [(os.path.basename(path).split(".")[0], Image.fromarray(img))
            for path, img in zip(photos.filenames, photos.images)]
    for i in range(n):
        name, img = srcs[i % len(srcs)]
        w, h = img.size
        frac = rng.uniform(0.5, 1.0)
        cw, ch = int(w * frac), int(h * frac)
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        size = (500, 375) if rng.random() < 0.7 else (375, 500)
        out = img.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        os.makedirs(f"{root}/{name}", exist_ok=True)
        out.save(f"{root}/{name}/{i:05d}.jpg", "JPEG", quality=90)
    return root


FIRST_BATCH_S: dict = {}  # pipeline -> [seconds from each pass's start to its first batch]; the first pass forks
WORKER_RSS: dict = {}  # pipeline -> the largest resident set of one worker process seen during a pass


def _pass(name: str, batches) -> int:
    """Images of one pass over `batches`; records the time to its first batch and, on the pipeline's first pass
    (the one that forks its workers), the workers' peak RSS (resident pages, shared ones included: an upper
    bound of what each worker adds). Workers persist across passes, as ours do across epochs."""
    import psutil

    me, t0, n, peak = psutil.Process(), time.perf_counter(), 0, 0
    others = {p.pid for p in me.children()}  # idle workers of the pipelines measured before
    for i, (x, _) in enumerate(batches):
        if i == 0:
            FIRST_BATCH_S.setdefault(name, []).append(time.perf_counter() - t0)
        if i % 4 == 0 and name not in WORKER_RSS:
            for child in me.children():
                try:
                    if child.pid not in others:
                        peak = max(peak, child.memory_info().rss)
                except psutil.Error:  # a worker that just ended
                    pass
        n += len(x)
    WORKER_RSS.setdefault(name, peak)
    return n


def _ours(index: str, args, normalize_on_cpu: bool = False):
    """A full pass of the train stream; returns the images delivered.

    The stream hands uint8 batches to the accelerator, which normalises them; the headline leaves that
    step out (the baseline's float conversion is part of its standard CPU pipeline). `normalize_on_cpu`
    adds it back on the CPU, as a CPU-only run pays it, for the extra figure."""
    from dataclasses import replace

    from pretrain.config import load_config
    from pretrain.data import build_train_stream, normalize

    data = replace(load_config(None).data, train_urls=index, batch_size=args.loader_batch,
                   workers=args.loader_workers, shuffle_block=256)
    stream = build_train_stream(data, 0, 1, img_size=args.loader_size, augment="train", seed=0)

    def one_pass() -> int:
        if not normalize_on_cpu:
            return _pass("ours", stream.iter_epoch(0))
        n = 0
        for x, _ in stream.iter_epoch(0):
            normalize(x, data.mean, data.std)
            n += len(x)
        return n

    return one_pass


def _torchvision(folder: str, args):
    import pretrain._compat  # noqa: F401
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(args.loader_size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = datasets.ImageFolder(folder, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.loader_batch, shuffle=True, drop_last=True,
                                         num_workers=args.loader_workers, persistent_workers=True)
    def one_pass() -> int:
        return _pass("baseline", loader)

    return one_pass


def _uint8_augment(size: int):
    """The peers' augmentation: torchvision v2 RandomResizedCrop + flip on the decoded PIL image, uint8 out
    (what ours hands over), so every pipeline ends in the same uint8 batch of the same size."""
    import pretrain._compat  # noqa: F401
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])


def _webdataset(shards: str, args):
    """webdataset's own pipeline on our shards: shard shuffle, a 256-sample shuffle buffer, PIL decode,
    the uint8 augmentation, batches collated in the workers (open_clip's loader is built the same way)."""
    import json

    import webdataset as wds

    names = json.load(open(f"{shards}/train.json"))["shards"]
    tf = _uint8_augment(args.loader_size)
    ds = (wds.WebDataset([f"{shards}/{n}" for n in names], shardshuffle=len(names), empty_check=False)
          .shuffle(256).decode("pil").to_tuple("jpg", "cls").map_tuple(tf, int)
          .batched(args.loader_batch, partial=False))
    loader = wds.WebLoader(ds, batch_size=None, num_workers=args.loader_workers, persistent_workers=True)

    def one_pass() -> int:
        return _pass("webdataset", loader)

    return one_pass


def _timm_wds(shards: str, args):
    """timm's WebDataset reader (`create_dataset("wds/...")`, reading the `_info.json` our writer leaves)
    with the same uint8 augmentation, batched by the DataLoader."""
    import torch

    import pretrain._compat  # noqa: F401  before timm: makes it importable on a CPU-only torch
    from timm.data import create_dataset

    ds = create_dataset("wds/bench", root=shards, split="train", is_training=True, batch_size=args.loader_batch)
    ds.transform = _uint8_augment(args.loader_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.loader_batch, num_workers=args.loader_workers,
                                         persistent_workers=True,
                                         drop_last=True)

    def one_pass() -> int:
        return _pass("timm_wds", loader)

    return one_pass


def _decode_ceiling(folder: str, limit: int = 200) -> float:
    """Full-size decodes per second on one core with the decoder the stream uses (no crop, no resize)."""
    from PIL import Image

    from pretrain.data.transforms import _simplejpeg

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".jpg"))[:limit]
    blobs = [open(f, "rb").read() for f in files]
    import io

    t0 = time.perf_counter()
    for b in blobs:
        if _simplejpeg is not None:
            _simplejpeg.decode_jpeg(b, "RGB")
        else:
            Image.open(io.BytesIO(b)).convert("RGB")
    return len(blobs) / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> dict:
    from pretrain.data.writer import write_shards

    n = 256 if args.quick else args.loader_images
    passes = 2 if args.quick else args.loader_passes
    tmp = None
    root = args.loader_dir
    if not root:
        tmp = tempfile.TemporaryDirectory(prefix="bench-loader-")
        root = tmp.name
    folder, shards = f"{root}/photos", f"{root}/shards"
    if not os.path.isdir(folder):
        make_photos(folder, n)
    if not os.path.exists(f"{shards}/train.json"):
        write_shards(folder, shards, samples_per_shard=max(32, n // 8))
    from pretrain.bench.timing import interleaved, median

    fns = {"ours": _ours(f"{shards}/train.json", args), "baseline": _torchvision(folder, args),
           "ours_cpu_norm": _ours(f"{shards}/train.json", args, normalize_on_cpu=True),
           "webdataset": _webdataset(shards, args), "timm_wds": _timm_wds(shards, args)}
    counts = {k: fn() for k, fn in fns.items()}  # images per pass (both drop only a partial last batch)
    # the untimed first passes forked every pipeline's workers; the timed passes reuse them
    times = interleaved(fns, rounds=passes, warmup=0)
    rate = {k: counts[k] / median(times[k]) for k in fns}
    ours, base = rate["ours"], rate["baseline"]
    ceiling = _decode_ceiling(folder)
    if tmp is not None:
        tmp.cleanup()
    ratio = ours / base
    peers = {"webdataset": rate["webdataset"], "timm_wds": rate["timm_wds"]}
    best = max(peers, key=peers.get)
    from pretrain.data import transforms as _t

    decoder = "simplejpeg" if _t._simplejpeg is not None else "PIL"
    print(f"loader: ours {ours:.1f} img/s ({rate['ours_cpu_norm']:.1f} with normalisation on the CPU), "
          f"torchvision {base:.1f} img/s, ratio {ratio:.2f}; peers (uint8 out): webdataset "
          f"{peers['webdataset']:.1f}, timm wds reader {peers['timm_wds']:.1f} img/s, ours / best peer "
          f"({best}) {ours / peers[best]:.2f}; first batch after (s), workers forked / reused: "
          + ", ".join(f"{k} {v[0]:.2f} / {median(v[1:]):.2f}" for k, v in FIRST_BATCH_S.items()) + "; worker RSS (MiB): "
          + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in WORKER_RSS.items()) + "; "
          f"single-core decode-only ceiling {ceiling:.1f} img/s ({args.loader_workers} workers, "
          f"{args.loader_size}px, {n} JPEGs ~500x375 q90, decoder {decoder})", file=sys.stderr)
    return {"name": "loader", "ours": ours, "baseline": base, "unit": "images/s", "ratio": ratio,
            "goal": 1.5, "met": ratio >= 1.5, "decode_only_1core": ceiling,
            "peers": peers, "best_peer": best, "images_per_pass": counts,
            "first_batch_s": {k: v[0] for k, v in FIRST_BATCH_S.items()},
            "first_batch_reused_s": {k: median(v[1:]) for k, v in FIRST_BATCH_S.items()}, "worker_rss_mib": {k: v / 2**20 for k, v in WORKER_RSS.items()}, "ratio_to_best_peer": ours / peers[best], "peer_goal": 2.0,
            "peer_goal_met": ours / peers[best] >= 2.0,
            "ours_with_cpu_normalize": rate["ours_cpu_norm"], "ratio_with_cpu_normalize": rate["ours_cpu_norm"] / base, "workers": args.loader_workers,
            "size": args.loader_size, "images": n, "batch": args.loader_batch, "decoder": decoder}
