"""What the train and eval streams share: reading a sample by its position in a shard, decoding it with bad
samples counted, and the life of DataLoader workers (set-up, shut-down, a worker's UserError re-raised)."""
from __future__ import annotations

import atexit
import functools
import gc
import logging
import multiprocessing
import os
import signal
from collections import Counter
from typing import Optional

import numpy as np
import torch

from pretrain.data.tario import ShardCursor
from pretrain.data.transforms import BadSample, Decoder
from pretrain.errors import UserError

log = logging.getLogger(__name__)


class Reader:
    """Random-ish access to samples by (shard, index); keeps one shard open and moves forward in it."""

    def __init__(self, shards: list[str]):
        self.shards = shards
        self.cur: Optional[ShardCursor] = None
        self.cur_shard = -1

    def get(self, shard: int, i: int) -> tuple[str, str, Optional[dict], Optional[str]]:
        url = self.shards[shard]
        if self.cur is None or self.cur_shard != shard or self.cur.pos > i:
            self.close()
            self.cur, self.cur_shard = ShardCursor(url), shard
        if self.cur.pos < i:
            self.cur.skip(i - self.cur.pos)
        got = self.cur.read() if self.cur.pos == i else None
        if got is None:
            return url, f"#{i}", None, "truncated"
        return url, got[0], got[1], None

    def close(self) -> None:
        if self.cur is not None:
            self.cur.close()
            self.cur = None


def _label(sample: dict, num_classes: int) -> int:
    raw = sample.get("cls")
    if raw is None:
        if num_classes > 0:
            raise BadSample("label_missing")
        return -1
    try:
        lab = int(raw.decode().strip())
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise BadSample("label_missing") from None
    if num_classes > 0 and not 0 <= lab < num_classes:
        raise BadSample("label_out_of_range")
    return lab


def decode_one(entry, decoder: Decoder, num_classes: int, bad: Counter):
    url, key, sample, kind = entry
    try:
        if kind is not None:
            raise BadSample(kind)
        label = _label(sample, num_classes)
        return decoder(sample), label
    except BadSample as e:
        bad[e.args[0]] += 1
        log.warning("skipping %s sample %r in shard %s", e.args[0], key, url)
        return None


def to_batch(images: list[np.ndarray], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    # (B, C, H, W) uint8 view of (B, H, W, C) memory (torch's channels_last): no transposing copy here
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return x, torch.tensor(labels, dtype=torch.int64)


def worker_init(_):
    """Data workers ignore SIGTERM and SIGUSR1. SLURM signals every process of a job step, workers included;
    torch's worker handler re-raises a SIGTERM that does not come from the trainer, so the worker died and the
    trainer failed with "DataLoader worker killed" instead of checkpointing. A worker still ends with its
    trainer: on the iterator's shutdown, at `_end_workers_at_exit`, or on a signal once the trainer is gone
    (torchrun signals a dead rank's process group)."""
    torch.set_num_threads(1)
    trainer = os.getppid()

    def on_signal(signum, frame):
        if os.getppid() != trainer:
            os._exit(0)

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, on_signal)


@functools.cache
def register_worker_reaper() -> None:
    atexit.register(_end_workers_at_exit)  # registered after multiprocessing's own handler, so it runs first


def _end_workers_at_exit() -> None:
    """multiprocessing's exit handler SIGTERMs daemonic children and then joins them: a data worker ignores
    SIGTERM (see `worker_init`), so a loader not shut down by then would make the trainer wait forever."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill as a worker failure
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


def reraise_user_errors(loader, keep: bool = False):
    """A UserError raised in a worker arrives wrapped with a traceback: re-raise it as one line. Workers are
    shut down when the consumer stops early too (not left to the garbage collector), and at the end unless
    `keep` (a persistent loader's workers wait for its next iteration)."""
    if loader.num_workers:
        register_worker_reaper()
        # workers are forked: a CUDA tensor left in the trainer's cyclic garbage and collected in a worker
        # would free device memory from a process that cannot use CUDA, which aborts the worker (seen on an
        # H100). Frozen objects are never collected in the workers (freezing is cheap; a gc.collect() here
        # cost ~0.3 s per loader); the trainer unfreezes them right after the fork.
        gc.freeze()
        try:
            it = iter(loader)
        finally:
            gc.unfreeze()
    else:
        it = iter(loader)
    finished = False
    try:
        yield from it
        finished = True
    except UserError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        msg = lines[-1].split("UserError: ", 1)[-1] if lines else str(e)
        raise UserError(msg) from None
    finally:
        if not (keep and finished):
            getattr(it, "_shutdown_workers", lambda: None)()


def count_samples(shards: list[str]) -> list[int]:
    """Samples per shard by reading tar headers only (for shard lists without an index)."""
    log.info("no sample counts for %d shards: counting them from tar headers", len(shards))
    counts = []
    for url in shards:
        c = ShardCursor(url)
        try:
            counts.append(c.skip(1 << 62))
        finally:
            c.close()
    return counts
