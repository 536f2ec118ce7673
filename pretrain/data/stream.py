"""The resumable train stream (see plan.py for the sample layout; eval_stream.py for the eval stream).

Workers yield whole uint8 batches; torch's DataLoader returns them in worker order, so the number of
batches the trainer has received fixes what every worker has consumed: the stream's state is one
counter per epoch layer, identical on every rank. Exact resume and re-splitting over another world
size are hand-written (webdataset has neither); tar access and URL opening are in tario.py / index.py.
A weighted mixture of sources (`data.sources`) reads its epochs through mixture.py's order, the same plan.
With a decode device (data.decode=gpu) the workers yield encoded batches with their crops drawn, and the
iterator decodes them in this process (device_decode.py): the same counters, the same samples and crops.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Iterator, Optional, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.device_decode import BatchDecoder, CropDraws, encoded_batch
from pretrain.data.index import ShardIndex, read_index
from pretrain.data.mixture import MIN_SHARE, Mixture, MixtureWindow
from pretrain.data.plan import EpochPlan, Layout, block_at
from pretrain.data.loading import Reader, count_samples, decode_one, reraise_user_errors, to_batch, worker_init
from pretrain.data.transforms import Decoder
from pretrain.errors import UserError
from pretrain.rng import generator, seed_all

if TYPE_CHECKING:
    from pretrain.config import DataConfig

log = logging.getLogger(__name__)

MIN_BAD_DENOMINATOR = 1000
"""The bad fraction is judged over at least this many samples, so one early bad sample is not fatal."""
STATE_VERSION = 2
"""The layout of `TrainStream.state_dict()`: 2 adds the mixture (its sources and where its epoch starts). A
version-1 state (one source) still resumes a run of one source; any other version is refused on load."""


def _seed_batch(*key: int) -> np.random.Generator:
    """Seed Python, NumPy and torch RNGs (used by the augmentations) from the batch's identity."""
    return np.random.default_rng(seed_all(*key))


# ----------------------------------------------------------------------------- train


class Planner:
    """Builds an epoch's plan (what the stream and its workers both need; small and picklable)."""

    def __init__(self, counts: list[int], seed: int, num_samples: int, resampled: bool, mixture: Optional[Mixture]):
        self.counts, self.seed, self.num_samples, self.resampled = counts, seed, num_samples, resampled
        self.mixture = mixture

    def plan(self, epoch: int, start: int, history: list) -> EpochPlan:
        """The plan of `epoch` after `history` ([(Layout, batches handed out)]); a mixture's epoch reads its
        global positions from `start` on."""
        order = MixtureWindow(self.mixture, start, self.num_samples) if self.mixture is not None else None
        return EpochPlan(self.counts, self.seed, epoch, history, self.num_samples if self.resampled else 0, order)


class SourceSet:
    """The sources a stream reads, as one list of shards: their names, where each one's shards begin in that
    list, the classes each one's labels index (0: labels not checked), and how they map onto the stream's
    classes (None: as they are)."""

    def __init__(self, names: list[str], first_shard: list[int], num_classes: list[int],
                 label_maps: Optional[list[Optional[np.ndarray]]] = None):
        self.names, self.count = names, len(names)
        self.first_shard = np.asarray(first_shard, dtype=np.int64)
        self.num_classes = num_classes
        self.label_maps = label_maps or [None] * len(names)

    def source_of(self, shard: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first_shard, shard, "right") - 1

    def decode(self, entry, source: int, decoder: Decoder, bad: Counter):
        """`decode_one` with the source's classes; its label mapped onto the stream's classes."""
        got = decode_one(entry, decoder, self.num_classes[source], bad)
        table = self.label_maps[source]
        if got is not None and table is not None and got[1] >= 0:
            got = got[0], int(table[got[1]])
        return got


def mixture_classes(lists: list[list[str]], where: list[str], policy: str,
                    labels: bool) -> tuple[list[str], list[Optional[np.ndarray]]]:
    """The classes of a mixture and each source's label map. Sources with one class list share it; without
    labels to learn, differing lists are ignored (none is checked); `policy` 'union' learns the union of the
    class names (the first source's order, then each later source's new names) with each source's labels mapped
    onto it by name; else differing lists are an error naming both."""
    none = [None] * len(lists)
    if all(c == lists[0] for c in lists):
        return lists[0], none
    if not labels:
        return [], none
    unlabelled = [w for w, c in zip(where, lists) if not c]
    if unlabelled:
        raise UserError(f"{unlabelled[0]} has no class list (its index names no classes) but another source has "
                        "one: this task learns from labels, so every source needs them (or train MAE on them)")
    if policy != "union":
        i = next(i for i, c in enumerate(lists) if c != lists[0])
        raise UserError(f"{where[i]} has classes {_short(lists[i])} but {where[0]} has {_short(lists[0])}: sources "
                        "must share one class list; write them with the same classes, or set "
                        "data.source_classes=union to learn the union of the class names")
    at: dict[str, int] = {}
    for c in lists:
        for n in c:
            at.setdefault(n, len(at))
    return list(at), [np.array([at[n] for n in c], dtype=np.int64) for c in lists]


def _short(names: list[str]) -> str:
    return repr(names) if len(names) <= 6 else f"[{', '.join(map(repr, names[:5]))}, ... {len(names)} in all]"


class _TrainSlots(IterableDataset):
    """One rank's worker slots for one epoch layer, starting after `n_start` batches of that layer.

    Given no plan, it serves whole epochs of the stream's own layout: each iteration reads the epoch
    from `epoch`, a tensor in shared memory the trainer sets before iterating, so persistent workers
    serve every epoch without being forked again."""

    def __init__(self, stream: "TrainStream", plan: Optional[EpochPlan] = None, n_start: int = 0):
        self.planner = stream.planner
        self.seed, self.layout = stream.seed, stream.layout
        self.shards, self.rank = stream.index.shards, stream.rank
        self.split = stream.draws is not None  # data.decode=gpu: the workers draw crops, decode nothing
        self.decoder = stream.draws if self.split else stream.decoder
        self.num_classes = stream.num_classes
        self.sources = stream.sources
        self.plan, self.n_start = plan, n_start
        self.epoch = torch.tensor(plan.epoch if plan else 0, dtype=torch.int64).share_memory_()
        self.start = torch.tensor(stream.start, dtype=torch.int64).share_memory_()  # a mixture epoch's first position

    def __iter__(self):
        info = get_worker_info()
        epoch = int(self.epoch)
        plan = self.plan or self.planner.plan(epoch, int(self.start), [(self.layout, 0)])
        layer = plan.layers[-1]
        lay = layer.layout
        # rotate so that DataLoader worker 0 is the slot whose batch comes next in the round-robin
        w = ((info.id if info else 0) + self.n_start) % lay.workers
        v0, batches, slot = layer.slot(self.rank, w)
        done = layer.consumed(w, self.n_start)
        b, starts = lay.batch_size, layer.blocks(batches)
        length, pos, k = batches * b, done * b, done
        reader = Reader(self.shards)
        pending: list = []  # (entry, its source)
        real: list = []  # False for padding (virtual index >= layer.m): decoded, weight 0
        last_good = None
        try:
            while pos < length:
                j, start, stop = block_at(starts, pos)
                perm = layer.block_perm(slot, j, stop - start)[pos - start:]  # the yielded part is skipped unread
                need = np.sort(perm)
                shard, intra = plan.locate(layer.points(v0 + start + need))
                src = self.sources.source_of(shard)
                got = {int(v): (reader.get(int(sh), int(i)), int(s)) for v, sh, i, s in zip(need, shard, intra, src)}
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

    def _batch(self, pending: list, real: list, layer: int, slot: int, epoch: int, k: int, last_good):
        """One batch: (images, labels, bad samples by kind, padding weight or None, per source (2, S): real
        samples and bad ones), and the last good sample (what fills a batch of none). Split (data.decode=gpu):
        the images are an EncodedBatch, decoded in the main process (device_decode.py)."""
        rng = _seed_batch(self.seed, epoch, layer, slot, k)
        bad: Counter = Counter()
        entries = [e for e, _ in pending]
        src = np.array([s for _, s in pending], dtype=np.int64)
        done = [self.sources.decode(e, s, self.decoder, bad) for e, s in zip(entries, src)]
        per_source = np.zeros((2, self.sources.count), np.int64)
        np.add.at(per_source[0], src[np.asarray(real, bool)], 1)
        np.add.at(per_source[1], src[[d is None for d in done]], 1)
        good = [d for d in done if d is not None]
        if not good:
            if last_good is None:
                raise UserError(f"all {len(entries)} samples of a batch were unreadable (first: "
                                f"{entries[0][1]!r} in {entries[0][0]}); check the shards")
            good = [last_good]
        # a skipped sample's place is filled by another sample of the batch: every rank keeps full,
        # equal batches (so no rank waits at a collective) and positions stay countable for resume
        fill = rng.integers(0, len(good), size=len(done))
        counted = [d is not None for d in done]
        done = [d if d is not None else good[fill[i]] for i, d in enumerate(done)]
        images, labels = [d[0] for d in done], [d[1] for d in done]
        if self.split:
            where = [f"{key!r} in shard {url}" for url, key, _, _ in entries]
            x, y = encoded_batch(images, labels, counted, where, src, (self.seed, epoch, layer, slot, k))
        else:
            x, y = to_batch(images, labels)
        weight = None if all(real) else torch.tensor(real, dtype=torch.float32)
        return (x, y, dict(bad), weight, per_source), good[-1]


@runtime_checkable
class BatchStream(Protocol):
    """What the trainer reads from its train stream. `TrainStream` is the one built from shards; tests'
    in-memory streams (`pretrain.bench.step.MemoryStream` and those built on it) satisfy it too, so the
    trainer runs on batches held in memory."""

    num_samples: int
    """Samples per epoch (the schedule's unit)."""
    num_classes: int
    """Classes of the labels (0: unlabelled)."""
    batches_per_epoch: int
    """Batches every rank receives per epoch (a whole number of optimizer steps)."""

    def iter_epoch_weighted(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                                                Optional[int]]]:
        """(images uint8 (B, C, H, W), labels int64 (B,), weight (B,) float32 or None, the step's real samples
        or None) from the current position to the epoch's end; see `TrainStream.iter_epoch_weighted`."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def bad_counts(self) -> dict[str, int]:
        """Bad samples skipped so far, by kind."""

    def source_counts(self) -> dict[str, dict[str, int]]:
        """A mixture's {source name: {"samples": n, "bad": n}} received on this rank; {} for one source."""

    def close(self) -> None: ...


class TrainStream:
    """Deterministic, resumable per-rank batches; see the module docstring and docs/data.md.

    `data`: the data.* settings; `img_size`: the model's input side in pixels; `augment`: the decoder's
    mode ('train': timm's supervised transforms, 'mae': crop + flip, 'eval': centre crop); `seed`: the
    run's seed (sample order and augmentations); `accum`: micro-batches per optimizer step (an epoch holds
    whole steps); `labels`: whether the trainer learns from labels (a mixture's sources need one class list
    only then); `index`: data.train_urls already read, or for a mixture each source's, in order;
    `decode_device`: None decodes in the workers; a device splits the work (device_decode.py): the workers
    draw the crops, this process decodes, crops, resizes and flips on that device (the CPU too, for tests)."""

    def __init__(self, data: DataConfig, rank: int, world_size: int, *, img_size: int, augment: str, seed: int,
                 accum: int = 1, labels: bool = True, index: "ShardIndex | list[ShardIndex] | None" = None,
                 decode_device: Optional[torch.device] = None):
        self.data, self.rank, self.world_size = data, rank, world_size
        self.seed = seed
        self.resampled = data.mode == "resampled"
        self.mixture: Optional[Mixture] = None
        self.mixture_record: Optional[list[dict]] = None  # a mixture's sources, as its state records them
        self.start = 0  # a mixture epoch's first global position (mixture.py)
        if data.sources:
            self._open_mixture(index, labels)
            total = sum(self.counts)
            self.num_samples = data.samples_per_epoch or total
        else:
            self.index = index or read_index(data.train_urls)
            self.counts = self.index.counts or count_samples(self.index.shards)
            self.num_classes = len(self.index.classes)
            self.sources = SourceSet(["train"], [0], [self.num_classes])
            total = sum(self.counts)
            self.num_samples = (data.samples_per_epoch or total) if self.resampled else total
        self.layout = Layout(world_size, max(1, data.workers), data.batch_size, self._shuffle_block(), accum)
        self.batches_per_epoch = self.num_samples // (world_size * data.batch_size * accum) * accum
        if self.batches_per_epoch == 0:
            raise UserError(f"{self.num_samples} samples per epoch cannot fill one batch of {data.batch_size} on "
                            f"each of {world_size} ranks; lower data.batch_size or add data")
        self.decoder = Decoder(augment, img_size, data)
        split = decode_device is not None
        self.draws = CropDraws(self.decoder) if split else None
        self.batch_decoder = BatchDecoder(img_size, self.decoder.interp, decode_device) if split else None
        self.planner = Planner(self.counts, seed, self.num_samples, self.resampled, self.mixture)
        self._epoch = 0
        self._history: list[list] = []  # [[Layout, batches handed out], ...] of the current epoch
        self._bad: Counter = Counter()
        self._read = 0
        self._per_source = np.zeros((2, self.sources.count), np.int64)  # real samples received, bad ones
        self._persistent: Optional[DataLoader] = None

    def _open_mixture(self, indexes: "Optional[list[ShardIndex]]", labels: bool) -> None:
        """The sources of data.sources as one list of shards, their classes, and the mixture's order."""
        sources = self.data.sources
        names = [src.name or f"source{i}" for i, src in enumerate(sources)]
        where = [f"data.sources[{i}] ({names[i]!r})" for i in range(len(sources))]
        if indexes is None:
            indexes = []
            for i, src in enumerate(sources):
                try:
                    indexes.append(read_index(src.train_urls))
                except UserError as e:
                    raise UserError(f"{where[i]}: {e}") from None
        counts = [ix.counts or count_samples(ix.shards) for ix in indexes]
        for i, c in enumerate(counts):
            if sum(c) == 0:
                raise UserError(f"{where[i]} holds no samples ({sources[i].train_urls!r}); write shards there or "
                                "remove the source")
        weights = [src.weight for src in sources]
        for i, w in enumerate(weights):
            if w / sum(weights) < MIN_SHARE:
                raise UserError(f"{where[i]}: weight {w} is {w / sum(weights):.2e} of the total, below the smallest "
                                f"share {MIN_SHARE}; raise it or remove the source")
        classes, maps = mixture_classes([list(ix.classes) for ix in indexes], where, self.data.source_classes, labels)
        shards = [u for ix in indexes for u in ix.shards]
        sizes = [b for ix in indexes for b in ix.sizes] if all(ix.sizes for ix in indexes) else None
        self.index = ShardIndex(shards, [n for c in counts for n in c], classes, sizes)
        self.counts = self.index.counts
        self.num_classes = len(classes)
        self.mixture = Mixture(counts, weights, self.seed, self.resampled)
        self.sources = SourceSet(names, self.mixture.first_shard[:-1], [len(ix.classes) if labels else 0
                                                                       for ix in indexes], maps)
        # what a resume must find unchanged: each source's name, weight and size (built once: every state has it)
        self.mixture_record = [{"name": n, "weight": w, "num_shards": len(c), "num_samples": sum(c)}
                               for n, w, c in zip(names, weights, counts)]

    def _shuffle_block(self) -> int:
        """data.shuffle_block, lowered so that a block's raw samples fit in data.shuffle_mb by the index's mean
        sample size (the same on every rank: all read one index); at least one batch."""
        d = self.data
        if not d.shuffle_mb or not self.index.sizes:
            return d.shuffle_block
        mean = sum(self.index.sizes) / max(1, sum(self.counts))
        return max(min(d.batch_size, d.shuffle_block), min(d.shuffle_block, int(d.shuffle_mb * 2**20 // mean)))

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "mode": self.data.mode, "seed": self.seed,
                "num_samples": self.num_samples, "num_shards": len(self.counts), "epoch": self._epoch,
                "sources": self.mixture_record, "start": self.start,
                "layers": [{**lay.to_dict(), "batches": n} for lay, n in self._history]}

    def load_state_dict(self, d: dict) -> None:
        version = d.get("version")
        if version == 1 and self.mixture is not None:
            raise UserError("data state has version 1, written before mixtures, for one source (data.train_urls): "
                            "this run reads data.sources; resume with the run's own config, or start a new run")
        if version not in (1, STATE_VERSION):
            raise UserError(f"data state has version {version!r}; this build reads versions 1 and {STATE_VERSION}: "
                            "resume with the build that wrote the checkpoint, or start a new run")
        saved, now = d.get("sources"), self.mixture_record
        if saved != now:
            def show(rec):
                return "data.train_urls (one source)" if rec is None else ", ".join(
                    f"{r['name']} (weight {r['weight']}, {r['num_shards']} shards, {r['num_samples']} samples)"
                    for r in rec)
            raise UserError(f"data state was saved reading {show(saved)} but this run reads {show(now)}: a run's "
                            "sources and weights are fixed; resume with the same ones, or start a new run "
                            "(finetune.init_from takes its exported weights)")
        want = {"mode": self.data.mode, "seed": self.seed, "num_samples": self.num_samples,
                "num_shards": len(self.counts)}
        for key, value in want.items():
            if d.get(key) != value:
                raise UserError(f"data state was saved with {key}={d.get(key)!r} but this run has {value!r}; "
                                "resume with the same shards, seed and data.mode (or start a new run)")
        self._epoch = int(d["epoch"])
        self.start = int(d.get("start", 0))
        self._history = [[Layout(l["world_size"], l["workers"], l["batch_size"], l["shuffle_block"],
                                 l.get("accum", 1), l.get("ramp", False)), int(l["batches"])] for l in d["layers"]]

    def bad_counts(self) -> dict[str, int]:
        return dict(self._bad)

    def source_counts(self) -> dict[str, dict[str, int]]:
        """{source name: {"samples": real samples received, "bad": bad ones among them}} on this rank since the
        stream was built; {} for one source (its figures are the run's own)."""
        if self.mixture is None:
            return {}
        return {n: {"samples": int(a), "bad": int(b)} for n, a, b in zip(self.sources.names, *self._per_source)}


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
        return self.planner.plan(epoch, self.start, [tuple(h) for h in self._history])

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
        persistent = self.data.workers > 0 and len(plan.layers) == 1 and cur[1] == 0
        loader = self._loader(plan) if persistent else self._make_loader(_TrainSlots(self, plan, cur[1]))
        got = 0
        try:
            for x, y, bad, weight, per_source in reraise_user_errors(loader, keep=persistent):
                per_source = np.asarray(per_source)  # the loader hands it over as a tensor
                if self.batch_decoder is not None:
                    x = self._decode(x, bad, per_source)
                n = cur[1]
                first = n - n % accum  # a layer starts at a step boundary, so its steps are [first, first + accum)
                real = None
                if any(i in short for i in range(first, first + accum)):
                    real = sum(short.get(i, full) for i in range(first, first + accum))
                cur[1] += 1
                got += 1
                self._account(bad, len(y))
                self._per_source += per_source
                yield x, y, weight, real
        finally:
            if persistent and got < left:  # stopped early: its workers were shut down
                self._persistent = None
        if got != left:
            raise RuntimeError(f"epoch {epoch}: expected {left} batches on rank {self.rank}, got {got}")
        if self.mixture is not None:  # the next mixture epoch reads on from what this one's layers read in all
            first = plan.layers[0]
            self.start += first.batches_per_rank * first.layout.world_size * first.layout.batch_size
        self._epoch, self._history = epoch + 1, []

    def _decode(self, batch, bad: dict, per_source: np.ndarray) -> torch.Tensor:
        """A worker's EncodedBatch as uint8 (B, 3, S, S) on the decode device; what no decoder could read is
        counted `undecodable` (in `bad` and `per_source`, as a worker counts) and filled (BatchDecoder)."""
        images, failed = self.batch_decoder(batch)
        counted = [i for i in failed if batch.counted[i]]  # a place filled in the worker is its filler's failure
        if counted:
            bad["undecodable"] = bad.get("undecodable", 0) + len(counted)
            np.add.at(per_source[1], batch.sources[counted], 1)
        return images

    def _make_loader(self, ds: "_TrainSlots", persistent: bool = False) -> DataLoader:
        workers = self.data.workers
        return DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                          worker_init_fn=worker_init if workers else None, persistent_workers=persistent,
                          prefetch_factor=2 if workers else None,
                          generator=generator(self.seed, ds.epoch.item(), self.rank))  # not the global generator

    def _loader(self, plan: EpochPlan) -> DataLoader:
        """The persistent workers' loader, set to serve `plan`'s epoch (workers forked on first use)."""
        if self._persistent is None:
            self._persistent = self._make_loader(_TrainSlots(self), persistent=True)
        self._persistent.dataset.epoch.fill_(plan.epoch)
        self._persistent.dataset.start.fill_(self.start)
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
        limit = self.data.max_bad_fraction
        if total > limit * max(self._read, MIN_BAD_DENOMINATOR):
            kinds = ", ".join(f"{k}={v}" for k, v in sorted(self._bad.items()))
            raise UserError(f"{total} of {self._read} samples read were bad ({kinds}), more than "
                            f"data.max_bad_fraction={limit}; fix the shards or raise the limit")


def build_train_stream(data: DataConfig, rank: int, world_size: int, *, img_size: int, augment: str, seed: int,
                       accum: int = 1, labels: bool = True,
                       index: "ShardIndex | list[ShardIndex] | None" = None,
                       decode_device: Optional[torch.device] = None) -> TrainStream:
    """The train stream of `data.train_urls`, or of the mixture of `data.sources` (arguments as `TrainStream`'s;
    `index`: the shard indexes already read, by one rank for all; default: read here; `decode_device`: where
    the main process decodes (data.decode=gpu), None: in the workers)."""
    return TrainStream(data, rank, world_size, img_size=img_size, augment=augment, seed=seed, accum=accum,
                       labels=labels, index=index, decode_device=decode_device)


# ----------------------------------------------------------------------------- eval


