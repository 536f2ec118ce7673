"""The resumable train stream and the exactly-once eval stream (see plan.py for the sample layout).

Workers yield whole uint8 batches; torch's DataLoader returns them in worker order, so the number of
batches the trainer has received fixes what every worker has consumed: the stream's state is one
counter per epoch layer, identical on every rank. Exact resume and re-splitting over another world
size are hand-written (webdataset has neither); tar access and URL opening are in tario.py / index.py.
"""
from __future__ import annotations

import atexit
import functools
import gc
import logging
import multiprocessing
import os
import signal
from collections import Counter
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.index import ShardIndex, read_index
from pretrain.data.plan import EpochPlan, Layout, block_at, seg_points
from pretrain.data.tario import ShardCursor
from pretrain.data.transforms import BadSample, Decoder
from pretrain.errors import UserError
from pretrain.rng import generator, seed_all

log = logging.getLogger(__name__)

BAD_KINDS = ("truncated", "not_image", "empty_image", "undecodable", "label_missing", "label_out_of_range")
MIN_BAD_DENOMINATOR = 1000
"""The bad fraction is judged over at least this many samples, so one early bad sample is not fatal."""
STATE_VERSION = 1


# ----------------------------------------------------------------------------- reading + decoding


class _Reader:
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


def _decode_one(entry, decoder: Decoder, num_classes: int, bad: Counter):
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


def _to_batch(images: list[np.ndarray], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    # (B, C, H, W) uint8 view of (B, H, W, C) memory (torch's channels_last): no transposing copy here
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return x, torch.tensor(labels, dtype=torch.int64)


def _seed_batch(*key: int) -> np.random.Generator:
    """Seed Python, NumPy and torch RNGs (used by the augmentations) from the batch's identity."""
    return np.random.default_rng(seed_all(*key))


def _worker_init(_):
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
def _register_worker_reaper() -> None:
    atexit.register(_end_workers_at_exit)  # registered after multiprocessing's own handler, so it runs first


def _end_workers_at_exit() -> None:
    """multiprocessing's exit handler SIGTERMs daemonic children and then joins them: a data worker ignores
    SIGTERM (see `_worker_init`), so a loader not shut down by then would make the trainer wait forever."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill as a worker failure
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


# ----------------------------------------------------------------------------- train


class _TrainSlots(IterableDataset):
    """One rank's worker slots for one epoch layer, starting after `n_start` batches of that layer.

    Given no plan, it serves whole epochs of the stream's own layout: each iteration reads the epoch
    from `epoch`, a tensor in shared memory the trainer sets before iterating, so persistent workers
    serve every epoch without being forked again."""

    def __init__(self, stream: "TrainStream", plan: Optional[EpochPlan] = None, n_start: int = 0):
        self.counts, self.seed, self.layout = stream.counts, stream.seed, stream.layout
        self.resampled_samples = stream.num_samples if stream.resampled else 0
        self.shards, self.rank = stream.index.shards, stream.rank
        self.decoder, self.num_classes = stream.decoder, stream.num_classes
        self.plan, self.n_start = plan, n_start
        self.epoch = torch.tensor(plan.epoch if plan else 0, dtype=torch.int64).share_memory_()

    def __iter__(self):
        info = get_worker_info()
        epoch = int(self.epoch)
        plan = self.plan or EpochPlan(self.counts, self.seed, epoch, [(self.layout, 0)], self.resampled_samples)
        layer = plan.layers[-1]
        lay = layer.layout
        # rotate so that DataLoader worker 0 is the slot whose batch comes next in the round-robin
        w = ((info.id if info else 0) + self.n_start) % lay.workers
        v0, batches, slot = layer.slot(self.rank, w)
        done = layer.consumed(w, self.n_start)
        segs = layer.slot_segs(self.rank, w)
        b, starts = lay.batch_size, layer.blocks(batches)
        length, pos, k = batches * b, done * b, done
        reader = _Reader(self.shards)
        pending: list = []
        real: list = []  # False for padding (virtual index >= layer.m): decoded, weight 0
        last_good = None
        try:
            while pos < length:
                j, start, stop = block_at(starts, pos)
                perm = layer.block_perm(slot, j, stop - start)[pos - start:]  # the yielded part is skipped unread
                need = np.sort(perm)
                shard, intra = plan.locate(seg_points(segs, need + start))
                got = {int(v): reader.get(int(sh), int(i)) for v, sh, i in zip(need, shard, intra)}
                for v in perm:
                    pending.append(got.pop(int(v)))
                    real.append(v0 + start + v < layer.m)
                    if len(pending) == b:
                        out, last_good = self._batch(pending, real, layer.index, slot, epoch, k, last_good)
                        yield out
                        pending, real, k = [], [], k + 1
                pos = stop
        finally:
            reader.close()

    def _batch(self, entries: list, real: list, layer: int, slot: int, epoch: int, k: int, last_good):
        rng = _seed_batch(self.seed, epoch, layer, slot, k)
        bad: Counter = Counter()
        done = [_decode_one(e, self.decoder, self.num_classes, bad) for e in entries]
        good = [d for d in done if d is not None]
        if not good:
            if last_good is None:
                raise UserError(f"all {len(entries)} samples of a batch were unreadable (first: "
                                f"{entries[0][1]!r} in {entries[0][0]}); check the shards")
            good = [last_good]
        # a skipped sample's place is filled by another sample of the batch: every rank keeps full,
        # equal batches (so no rank waits at a collective) and positions stay countable for resume
        fill = rng.integers(0, len(good), size=len(done))
        done = [d if d is not None else good[fill[i]] for i, d in enumerate(done)]
        x, y = _to_batch([d[0] for d in done], [d[1] for d in done])
        weight = None if all(real) else torch.tensor(real, dtype=torch.float32)
        return (x, y, dict(bad), weight), good[-1]


class TrainStream:
    """Deterministic, resumable per-rank batches; see the module docstring and docs/data.md."""

    def __init__(self, cfg, rank: int, world_size: int, index: Optional[ShardIndex] = None):
        from pretrain.models.vit import resolve_arch

        d = cfg.data
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.index = index or read_index(d.train_urls)
        self.counts = self.index.counts or count_samples(self.index.shards)
        self.num_classes = len(self.index.classes)
        self.seed = cfg.run.seed
        self.resampled = d.mode == "resampled"
        total = sum(self.counts)
        self.num_samples = (d.samples_per_epoch or total) if self.resampled else total
        self.layout = Layout(world_size, max(1, d.workers), d.batch_size, self._shuffle_block(), cfg.optim.accum_steps)
        self.batches_per_epoch = self.num_samples // (world_size * d.batch_size * self.layout.accum) * self.layout.accum
        if self.batches_per_epoch == 0:
            raise UserError(f"{self.num_samples} samples per epoch cannot fill one batch of {d.batch_size} on "
                            f"each of {world_size} ranks; lower data.batch_size or add data")
        img_size = resolve_arch(cfg.model)["img_size"]
        mode = "train" if cfg.task.kind in ("supervised", "finetune") else "mae"
        self.decoder = Decoder(mode, img_size, d)
        self._epoch = 0
        self._history: list[list] = []  # [[Layout, batches handed out], ...] of the current epoch
        self._bad: Counter = Counter()
        self._read = 0
        self._persistent: Optional[DataLoader] = None

    def _shuffle_block(self) -> int:
        """data.shuffle_block, lowered so that a block's raw samples fit in data.shuffle_mb by the index's mean
        sample size (the same on every rank: all read one index); at least one batch."""
        d = self.cfg.data
        if not d.shuffle_mb or not self.index.sizes:
            return d.shuffle_block
        mean = sum(self.index.sizes) / max(1, sum(self.counts))
        return max(min(d.batch_size, d.shuffle_block), min(d.shuffle_block, int(d.shuffle_mb * 2**20 // mean)))

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "mode": self.cfg.data.mode, "seed": self.seed,
                "num_samples": self.num_samples, "num_shards": len(self.counts), "epoch": self._epoch,
                "layers": [{**lay.to_dict(), "batches": n} for lay, n in self._history]}

    def load_state_dict(self, d: dict) -> None:
        want = {"mode": self.cfg.data.mode, "seed": self.seed, "num_samples": self.num_samples,
                "num_shards": len(self.counts)}
        for key, value in want.items():
            if d.get(key) != value:
                raise UserError(f"data state was saved with {key}={d.get(key)!r} but this run has {value!r}; "
                                "resume with the same shards, seed and data.mode (or start a new run)")
        self._epoch = int(d["epoch"])
        self._history = [[Layout(l["world_size"], l["workers"], l["batch_size"], l["shuffle_block"],
                                 l.get("accum", 1), l.get("ramp", False)), int(l["batches"])] for l in d["layers"]]

    def bad_counts(self) -> dict[str, int]:
        return dict(self._bad)

    def _plan(self, epoch: int) -> EpochPlan:
        if epoch != self._epoch:
            self._epoch, self._history = epoch, []
        if self._history and self._history[-1][0] != self.layout:
            if self._history[-1][1] == 0:
                self._history.pop()
            if self._history:
                self._history.append([self.layout, 0])
        if not self._history:
            self._history = [[self.layout, 0]]
        return EpochPlan(self.counts, self.seed, epoch, [tuple(h) for h in self._history],
                         self.num_samples if self.resampled else 0)

    def remaining_batches(self, epoch: int) -> int:
        """Batches `iter_epoch(epoch)` will yield from the current position."""
        plan = self._plan(epoch)
        return plan.layers[-1].batches_per_rank - self._history[-1][1]

    # -- iteration -----------------------------------------------------------------------------
    def iter_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) from the current position to the epoch's end (padding included: see
        `iter_epoch_weighted` for which samples are padding)."""
        for x, y, _, _ in self.iter_epoch_weighted(epoch):
            yield x, y

    def iter_epoch_weighted(self, epoch: int):
        """(images, labels, weight, real): `weight` is None for a batch without padding, else (B,) float32,
        0 for padding; `real` is None when the optimizer step this batch belongs to holds no padding on any
        rank, else that step's real samples summed over ranks and micro-batches (the same on every rank):
        the trainer averages the step's loss over those."""
        plan = self._plan(epoch)
        layer = plan.layers[-1]
        short, full, accum = layer.short_batches(), self.world_size * self.layout.batch_size, self.layout.accum
        cur = self._history[-1]
        if short and self.rank == 0 and cur[1] == 0:
            steps = len({n // accum for n in short})
            log.warning("epoch %d goes on with another layout: its last %d step(s) are ragged, %d padded samples "
                        "weigh 0 (each remaining sample is learnt from once; docs/data.md)", epoch, steps,
                        sum(full - c for c in short.values()))
        left = layer.batches_per_rank - cur[1]
        # a whole epoch of the stream's own layout goes to the persistent workers; the rest of an interrupted
        # or re-laid-out epoch to workers of its own
        persistent = self.cfg.data.workers > 0 and len(plan.layers) == 1 and cur[1] == 0
        loader = self._loader(plan) if persistent else self._make_loader(_TrainSlots(self, plan, cur[1]))
        got = 0
        try:
            for x, y, bad, weight in _reraise_user_errors(loader, keep=persistent):
                n = cur[1]
                first = n - n % accum  # a layer starts at a step boundary, so its steps are [first, first + accum)
                real = None
                if any(i in short for i in range(first, first + accum)):
                    real = sum(short.get(i, full) for i in range(first, first + accum))
                cur[1] += 1
                got += 1
                self._account(bad, len(y))
                yield x, y, weight, real
        finally:
            if persistent and got < left:  # stopped early: its workers were shut down
                self._persistent = None
        if got != left:
            raise RuntimeError(f"epoch {epoch}: expected {left} batches on rank {self.rank}, got {got}")
        self._epoch, self._history = epoch + 1, []

    def _make_loader(self, ds: "_TrainSlots", persistent: bool = False) -> DataLoader:
        workers = self.cfg.data.workers
        return DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                          worker_init_fn=_worker_init if workers else None, persistent_workers=persistent,
                          prefetch_factor=2 if workers else None,
                          generator=generator(self.seed, ds.epoch.item(), self.rank))  # not the global generator

    def _loader(self, plan: EpochPlan) -> DataLoader:
        """The persistent workers' loader, set to serve `plan`'s epoch (workers forked on first use)."""
        if self._persistent is None:
            self._persistent = self._make_loader(_TrainSlots(self), persistent=True)
        self._persistent.dataset.epoch.fill_(plan.epoch)
        return self._persistent

    def close(self) -> None:
        """End the persistent workers (they also end with the process)."""
        loader, self._persistent = self._persistent, None
        it = getattr(loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()

    def _account(self, bad: dict, n: int) -> None:
        self._bad.update(bad)
        self._read += n
        total = sum(self._bad.values())
        limit = self.cfg.data.max_bad_fraction
        if total > limit * max(self._read, MIN_BAD_DENOMINATOR):
            kinds = ", ".join(f"{k}={v}" for k, v in sorted(self._bad.items()))
            raise UserError(f"{total} of {self._read} samples read were bad ({kinds}), more than "
                            f"data.max_bad_fraction={limit}; fix the shards or raise the limit")


def _reraise_user_errors(loader, keep: bool = False):
    """A UserError raised in a worker arrives wrapped with a traceback: re-raise it as one line. Workers are
    shut down when the consumer stops early too (not left to the garbage collector), and at the end unless
    `keep` (a persistent loader's workers wait for its next iteration)."""
    if loader.num_workers:
        _register_worker_reaper()
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


def build_train_stream(cfg, rank: int, world_size: int, index: Optional[ShardIndex] = None) -> TrainStream:
    """`index`: data.train_urls already read (by one rank for all); default: read here."""
    return TrainStream(cfg, rank, world_size, index)


# ----------------------------------------------------------------------------- eval


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
        reader = _Reader(self.shards)
        bad: Counter = Counter()
        imgs, labs = [], []
        try:
            for p in range(a, b):
                sh = int(np.searchsorted(cum, p, "right") - 1)
                got = _decode_one(reader.get(sh, p - int(cum[sh])), self.decoder, self.num_classes, bad)
                if got is not None:
                    imgs.append(got[0])
                    labs.append(got[1])
                if len(imgs) == self.batch_size or (p == b - 1 and imgs):
                    yield _to_batch(imgs, labs)
                    imgs, labs = [], []
        finally:
            reader.close()


class EvalStream:
    """Every sample exactly once across ranks, in index order, no drop; bad samples skipped and logged."""

    def __init__(self, urls, cfg, rank: int, world_size: int, index: Optional[ShardIndex] = None):
        from pretrain.models.vit import resolve_arch

        self.index = index or read_index(urls)
        self.counts = self.index.counts or count_samples(self.index.shards)
        self.num_classes = len(self.index.classes)
        self.num_samples = sum(self.counts)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.decoder = Decoder("eval", resolve_arch(cfg.model)["img_size"], cfg.data)

    def __iter__(self):
        workers = self.cfg.data.workers
        ds = _EvalSlots(self.index.shards, self.counts, self.rank, self.world_size, max(1, workers),
                        self.cfg.data.batch_size, self.decoder, self.num_classes)
        loader = DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                            worker_init_fn=_worker_init if workers else None,
                            generator=generator(self.rank))  # leaves the global generator alone
        yield from _reraise_user_errors(loader)


def build_eval_stream(urls, cfg, rank: int, world_size: int, index: Optional[ShardIndex] = None) -> EvalStream:
    """`index`: `urls` already read (by one rank for all); default: read here."""
    return EvalStream(urls, cfg, rank, world_size, index)


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
