"""Which samples each worker slot reads in an epoch, and what remains of an epoch after an interruption.

Positions: an epoch orders its shards (a seeded permutation; in resampled mode a seeded draw with
replacement) and concatenates them into one sequence of N samples, rotated by a seeded offset so that
the dropped tail differs each epoch. Position p is sample (p + offset) mod N of that concatenation.

A *layer* splits a sequence of positions (virtual indices 0..m-1) over R ranks x W workers ("slots").
Every rank gets the same number of whole batches; within a rank, worker w takes a contiguous run of
batches, and the DataLoader hands batches out round-robin (batch j comes from worker j mod W), so
after n batches on a rank each worker's consumption is known: n // W + (w < n % W) batches.
Within a slot, blocks of samples are permuted with an RNG seeded by (seed, epoch, layer, slot, block). The
blocks grow from one batch, doubling up to S (`block_starts`), so a worker's first batch needs one batch of
samples read, not S (webdataset's shuffle buffer starts small for the same reason).

An optimizer step takes A micro-batches (gradient accumulation), so an epoch holds whole steps: the first
layer has a multiple of A batches per rank and drops the < R*B*A tail. Resuming with another world size,
worker count, micro-batch size or A adds a layer over exactly the positions the previous layers did not
consume. When those do not fill whole steps on every rank, the layer is padded (repeating its first
positions) to equal batch counts, and the padded samples carry weight 0: the epoch's last steps are
ragged, their loss averaged over the real samples only (`Layer.short_batches`), so each sample of the
epoch is learnt from exactly once whatever the re-layouts. The cost: up to R*B*A-1 padded samples
decoded and computed, but not learnt from, once per re-layout.

Cost: every rank builds the plan at an epoch's start and at a resume, so it must not grow with the other
ranks' work. No layer lists positions: the first splits `Span(N)`, each later one the previous layer's
`Remainder`, O(slots) integers (where each old slot's untaken part begins; per worker, its current block and
how much of it was yielded). A virtual index maps down the layers to a position by a binary search per layer;
only an index inside a partly yielded block needs that block's permutation, computed on first use. So a rank
pays O(sum of slots over the layers) vectorised integer work plus the few old blocks its own slots read
(scripts/bench_plan.py: 4096 ranks x 8 workers over 10^9 samples, after 3 re-layouts, ~0.02 s and ~5 MB).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import numpy as np


@dataclass(frozen=True)
class Layout:
    world_size: int
    workers: int
    batch_size: int
    shuffle_block: int
    accum: int = 1
    ramp: bool = True  # blocks grow from one batch (False: states saved before the ramp existed)

    def to_dict(self) -> dict:
        return asdict(self)


def block_starts(length: int, batch: int, block: int, ramp: bool = True) -> np.ndarray:
    """Where each shuffle block of a slot's `length` samples starts, then `length`: blocks of
    batch, 2*batch, 4*batch, ... samples up to `block`, then `block` each (all `block` without ramp)."""
    sizes, total, size = [], 0, min(batch, block) if ramp else block
    while total < length:
        sizes.append(min(size, length - total))
        total += sizes[-1]
        size = min(2 * size, block)
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def block_at(starts: np.ndarray, pos: int) -> tuple[int, int, int]:
    """(index, start, stop) of the block of `block_starts` that holds slot position `pos`."""
    j = int(np.searchsorted(starts, pos, "right") - 1)
    return j, int(starts[j]), int(starts[j + 1])


def seg_points(segs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Positions at indices v (each < the total length) of a sequence given as (k, 2) [start, stop) segments."""
    starts = np.concatenate([[0], np.cumsum(segs[:, 1] - segs[:, 0])]).astype(np.int64)
    i = np.searchsorted(starts, v, "right") - 1
    return segs[i, 0] + (v - starts[i])


def points_to_segs(p: np.ndarray) -> np.ndarray:
    """(k, 2) [start, stop) segments of consecutive runs in positions p."""
    if len(p) == 0:
        return np.zeros((0, 2), np.int64)
    breaks = np.nonzero(np.diff(p) != 1)[0] + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(p)]])
    return np.stack([p[starts], p[stops - 1] + 1], axis=1).astype(np.int64)


class Span:
    """Positions 0..n-1 in order: the sequence the first layer of an epoch splits."""

    def __init__(self, n: int):
        self.length = n

    def points(self, v: np.ndarray) -> np.ndarray:
        return v


class Layer:
    """One layout's split of a sequence (a `Span` or a `Remainder`) of m positions over its slots."""

    def __init__(self, seq: "Span | Remainder", layout: Layout, index: int, seed: int, epoch: int):
        self.seq, self.layout, self.index, self.seed, self.epoch = seq, layout, index, seed, epoch
        self.m = seq.length
        per_step = layout.world_size * layout.batch_size * layout.accum
        # first layer: drop the tail; later layers: pad (weight 0) so that no remaining sample is lost
        steps = self.m // per_step if index == 0 else -(-self.m // per_step)
        self.batches_per_rank = steps * layout.accum

    def slot(self, rank: int, worker: int) -> tuple[int, int, int]:
        """(first virtual index, batches, slot id) of a rank's worker."""
        w_count, b = self.layout.workers, self.layout.batch_size
        q, rem = divmod(self.batches_per_rank, w_count)
        first_batch = worker * q + min(worker, rem)
        v0 = (rank * self.batches_per_rank + first_batch) * b
        return v0, q + (worker < rem), rank * w_count + worker

    def consumed(self, worker: int, n: int) -> int:
        """Batches worker `worker` has handed out after its rank handed out n (round-robin order)."""
        w_count = self.layout.workers
        _, batches, _ = self.slot(0, worker)
        return min(batches, n // w_count + (worker < n % w_count))

    def points(self, v: np.ndarray) -> np.ndarray:
        """Positions at virtual indices v; an index >= m (padding) repeats the position at v mod m."""
        return self.seq.points(v % self.m) if self.m else v

    def slot_segs(self, rank: int, worker: int) -> np.ndarray:
        """A slot's positions as segments, in virtual index order (materialises the slot: for tests)."""
        v0, batches, _ = self.slot(rank, worker)
        return points_to_segs(self.points(np.arange(v0, v0 + batches * self.layout.batch_size)))

    def blocks(self, batches: int) -> np.ndarray:
        """`block_starts` of a slot holding `batches` batches."""
        lay = self.layout
        return block_starts(batches * lay.batch_size, lay.batch_size, lay.shuffle_block, lay.ramp)

    def slot_order(self, rank: int, worker: int) -> Iterator[tuple[int, np.ndarray]]:
        """(block, slot-relative indices in the order the slot yields them) for each block of a slot."""
        _, batches, slot = self.slot(rank, worker)
        starts = self.blocks(batches)
        for j in range(len(starts) - 1):
            yield j, self.block_perm(slot, j, int(starts[j + 1] - starts[j])) + starts[j]

    def short_batches(self) -> dict[int, int]:
        """{rank batch index: real samples in it summed over ranks} for the batches that hold padding (virtual
        index >= m); every other batch holds world_size * batch_size real samples. Padding exists only in a
        later layer, in the slot holding index m and the slots after it."""
        lay, b = self.layout, self.layout.batch_size
        full = lay.world_size * b
        if self.index == 0 or self.batches_per_rank * full == self.m:
            return {}
        total = np.zeros(self.batches_per_rank, np.int64)
        ranks = np.arange(lay.world_size, dtype=np.int64)
        for w in range(lay.workers):
            first, batches, _ = self.slot(0, w)
            v0 = ranks * (self.batches_per_rank * b) + first  # (R,) this worker's slot on each rank
            rows = np.arange(batches) * lay.workers + w  # slot batch k is its rank's batch k*W+w
            total[rows] += b * int(np.sum(v0 + batches * b <= self.m))  # slots wholly before m
            for r in np.flatnonzero((v0 < self.m) & (v0 + batches * b > self.m)):  # the slot holding m
                order = np.concatenate([o for _, o in self.slot_order(int(r), w)])
                total[rows] += (v0[r] + order < self.m).reshape(batches, b).sum(axis=1)
        return {n: int(c) for n, c in enumerate(total) if c < full}

    def block_perm(self, slot: int, block: int, length: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, self.index, slot, block])
        return rng.permutation(length)

    def remaining(self, n: int) -> "Remainder":
        """The positions not yet handed out after every rank handed out n batches (padding excluded)."""
        return Remainder(self, n)


class Remainder:
    """What a layer had not handed out after every rank handed out n batches, as the sequence the next layer
    splits: slot by slot in slot id order, the untaken part of the slot's current block in ascending order,
    then its blocks not begun (the order the plan has always used, so that saved states keep their meaning).

    Held as O(slots) integers: where each slot's part begins in the sequence and, per worker, which block is
    current and how much of it was taken. Nothing per sample: the untaken part of a block is sorted out of its
    permutation only when an index inside it is asked for, so a rank computes the blocks its own slots read
    through, not every slot's."""

    CACHE = 64  # untaken parts kept (each at most a shuffle block of int64)

    def __init__(self, layer: Layer, n: int):
        lay, b, m = layer.layout, layer.layout.batch_size, layer.m
        self.layer, self.workers = layer, lay.workers
        # per worker, the same on every rank: its slot's first index on rank 0, its size, samples yielded,
        # and (index, start, stop) of its current block (an empty block past the end once all is yielded)
        first, size, self.done = (np.zeros(lay.workers, np.int64) for _ in range(3))
        current = []
        for w in range(lay.workers):
            first[w], batches, _ = layer.slot(0, w)
            size[w], self.done[w] = batches * b, layer.consumed(w, n) * b
            whole = self.done[w] == size[w]
            current.append((0, size[w], size[w]) if whole else block_at(layer.blocks(batches), int(self.done[w])))
        self.block, self.start, self.stop = np.array(current, np.int64).reshape(-1, 3).T
        # per slot (id rank * W + worker): its first index, and how many of its samples the sequence holds
        worker = np.tile(np.arange(lay.workers), lay.world_size)
        self.base = np.repeat(np.arange(lay.world_size, dtype=np.int64) * (layer.batches_per_rank * b),
                              lay.workers) + first[worker]
        fresh, end = self.base + self.stop[worker], self.base + size[worker]  # blocks not begun: [fresh, end)
        self.left = np.clip(np.minimum(fresh, m) - (self.base + self.done[worker]), 0, None)
        tail = np.clip(np.minimum(end, m) - fresh, 0, None)
        self._cache: dict[int, np.ndarray] = {}
        for s in np.flatnonzero((self.base + self.start[worker] < m) & (fresh > m)):
            self.left[s] = len(self._left(int(s)))  # the block holding index m: its untaken padding is dropped
        self.cum = np.concatenate([[0], np.cumsum(self.left + tail)]).astype(np.int64)
        self.length = int(self.cum[-1])

    def _left(self, slot: int) -> np.ndarray:
        """The layer's virtual indices (< m) of the untaken part of `slot`'s current block, ascending."""
        got = self._cache.get(slot)
        if got is None:
            w = slot % self.workers
            start, stop = int(self.start[w]), int(self.stop[w])
            perm = self.layer.block_perm(slot, int(self.block[w]), stop - start)
            got = np.sort(perm[int(self.done[w]) - start:]) + start + self.base[slot]
            got = got[got < self.layer.m]
            if len(self._cache) >= self.CACHE:
                self._cache.clear()
            self._cache[slot] = got
        return got

    def points(self, u: np.ndarray) -> np.ndarray:
        """Positions at indices u (each < length) of this sequence."""
        k = np.searchsorted(self.cum, u, "right") - 1  # the slot whose part holds u
        o = u - self.cum[k]
        v = self.base[k] + self.stop[k % self.workers] + (o - self.left[k])  # in the blocks not begun
        inside = np.flatnonzero(o < self.left[k])  # in the untaken part of the current block
        if len(inside):
            by_slot = inside[np.argsort(k[inside], kind="stable")]
            for group in np.split(by_slot, np.flatnonzero(np.diff(k[by_slot])) + 1):
                v[group] = self._left(int(k[group[0]]))[o[group]]
        return self.layer.points(v)


class ShardOrder:
    """One epoch of one source: its shards in a seeded order (in resampled mode, a seeded draw with replacement
    until `resampled_samples` are covered), concatenated and rotated by a seeded offset (0 when resampled):
    position p is sample (p + offset) mod n of that concatenation. `key` seeds it: (seed, epoch, 7) for a
    run's one source, as always, so saved states keep their meaning."""

    def __init__(self, counts: list[int], key: list[int], resampled_samples: int = 0):
        rng = np.random.default_rng(key)
        counts_a = np.asarray(counts, dtype=np.int64)
        if resampled_samples:
            # endless stream: shards drawn with replacement until the window is covered
            draws, total = [], 0
            while total < resampled_samples:
                d = rng.integers(0, len(counts), size=max(1, len(counts)))
                draws.append(d)
                total += int(counts_a[d].sum())
            self.order = np.concatenate(draws).astype(np.int64)
            self.n = resampled_samples
            self.offset = 0
        else:
            self.order = rng.permutation(len(counts))
            self.n = int(counts_a.sum())
            self.offset = int(rng.integers(self.n)) if self.n else 0
        self.cum = np.concatenate([[0], np.cumsum(counts_a[self.order])]).astype(np.int64)

    def locate(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index into the source's list, sample index within that shard) of positions p."""
        q = (p + self.offset) % self.n
        k = np.searchsorted(self.cum, q, "right") - 1
        return self.order[k], q - self.cum[k]


class EpochPlan:
    """What an epoch reads (`order`: positions to samples) and its layers; `layers[-1]` is the one being read.

    `order` defaults to the `ShardOrder` of `counts` for this epoch; a mixture of sources passes its own
    (`pretrain.data.mixture.MixtureWindow`: the same `n` and `locate`, over every source's shards)."""

    def __init__(self, counts: Optional[list[int]], seed: int, epoch: int, history: list[tuple[Layout, int]],
                 resampled_samples: int = 0, order: "Optional[ShardOrder]" = None):
        self.epoch = epoch
        self.order = order if order is not None else ShardOrder(counts, [seed, epoch, 7], resampled_samples)
        self.n = self.order.n
        seq: Span | Remainder = Span(self.n)
        self.layers: list[Layer] = []
        for i, (layout, n) in enumerate(history):
            layer = Layer(seq, layout, i, seed, epoch)
            self.layers.append(layer)
            if i < len(history) - 1:
                seq = layer.remaining(n)

    def locate(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index into the stream's list, sample index within that shard) of positions p."""
        return self.order.locate(p)
