"""The eval stream: every sample of a split exactly once across ranks, in index order, no drop; bad
samples skipped and counted."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.index import ShardIndex, read_index
from pretrain.data.loading import Reader, count_samples, decode_one, reraise_user_errors, to_batch, worker_init
from pretrain.data.transforms import Decoder
from pretrain.rng import generator

if TYPE_CHECKING:
    from pretrain.config import DataConfig


class _EvalSlots(IterableDataset):
    def __init__(self, shards, counts, rank, world_size, workers, batch_size, decoder, num_classes):
        self.shards, self.counts, self.rank, self.world = shards, counts, rank, world_size
        self.workers, self.batch_size, self.decoder, self.num_classes = workers, batch_size, decoder, num_classes

    def __iter__(self):
        info = get_worker_info()
        n = sum(self.counts)
        a, b = self.rank * n // self.world, (self.rank + 1) * n // self.world
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        a, b = a + w * (b - a) // nw, a + (w + 1) * (b - a) // nw
        cum = np.concatenate([[0], np.cumsum(self.counts)])
        reader = Reader(self.shards)
        bad: Counter = Counter()
        imgs, labs = [], []
        try:
            for p in range(a, b):
                sh = int(np.searchsorted(cum, p, "right") - 1)
                got = decode_one(reader.get(sh, p - int(cum[sh])), self.decoder, self.num_classes, bad)
                if got is not None:
                    imgs.append(got[0])
                    labs.append(got[1])
                if len(imgs) == self.batch_size or (p == b - 1 and imgs):
                    yield to_batch(imgs, labs)
                    imgs, labs = [], []
        finally:
            reader.close()


class EvalStream:
    """Every sample exactly once across ranks, in index order, no drop; bad samples skipped and logged.

    `data`: its batch_size, workers and the eval crop (eval_crop_pct) are read; `img_size`: the model's
    input side in pixels."""

    def __init__(self, urls, data: DataConfig, rank: int, world_size: int, *, img_size: int,
                 index: Optional[ShardIndex] = None):
        self.index = index or read_index(urls)
        self.counts = self.index.counts or count_samples(self.index.shards)
        self.num_classes = len(self.index.classes)
        self.num_samples = sum(self.counts)
        self.data, self.rank, self.world_size = data, rank, world_size
        self.decoder = Decoder("eval", img_size, data)

    def __iter__(self):
        workers = self.data.workers
        ds = _EvalSlots(self.index.shards, self.counts, self.rank, self.world_size, max(1, workers),
                        self.data.batch_size, self.decoder, self.num_classes)
        loader = DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                            worker_init_fn=worker_init if workers else None,
                            generator=generator(self.rank))  # leaves the global generator alone
        yield from reraise_user_errors(loader)


def build_eval_stream(urls, data: DataConfig, rank: int, world_size: int, *, img_size: int,
                      index: Optional[ShardIndex] = None) -> EvalStream:
    """The eval stream of `urls` (arguments as `EvalStream`'s)."""
    return EvalStream(urls, data, rank, world_size, img_size=img_size, index=index)
