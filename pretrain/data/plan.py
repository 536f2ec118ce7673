"""Which samples each worker slot reads in an epoch, and what remains of an epoch after an interruption.

Positions: an epoch orders its shards (a seeded permutation; in resampled mode a seeded draw with
replacement) and concatenates them into one sequence of N samples, rotated by a seeded offset so that
the dropped tail differs each epoch. Position p is sample (p + offset) mod N of that concatenation.

A *layer* splits a sequence of positions (a list of segments) over R ranks x W workers ("slots").
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
Segments are (k, 2) int64 arrays of [start, stop) so a plan never materialises all N positions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

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


def _seg_starts(segs: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(segs[:, 1] - segs[:, 0])]).astype(np.int64)


def seg_len(segs: np.ndarray) -> int:
    return int((segs[:, 1] - segs[:, 0]).sum()) if len(segs) else 0


def seg_slice(segs: np.ndarray, v0: int, v1: int) -> np.ndarray:
    """Positions at virtual indices [v0, v1) of the sequence `segs` (indices taken modulo its length)."""
    m = seg_len(segs)
    starts = _seg_starts(segs)
    out = []
    while v0 < v1 and m > 0:
        base = (v0 // m) * m
        a, b = v0 - base, min(v1 - base, m)
        i0 = int(np.searchsorted(starts, a, "right") - 1)
        i1 = int(np.searchsorted(starts, b, "left"))
        part = segs[i0:i1].copy()
        part[0, 0] += a - starts[i0]
        part[-1, 1] -= starts[i1] - b
        out.append(part)
        v0 = base + b
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def seg_points(segs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Positions at virtual indices v (each < the sequence length)."""
    starts = _seg_starts(segs)
    i = np.searchsorted(starts, v, "right") - 1
    return segs[i, 0] + (v - starts[i])


def points_to_segs(p: np.ndarray) -> np.ndarray:
    if len(p) == 0:
        return np.zeros((0, 2), np.int64)
    breaks = np.nonzero(np.diff(p) != 1)[0] + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(p)]])
    return np.stack([p[starts], p[stops - 1] + 1], axis=1).astype(np.int64)


class Layer:
    def __init__(self, seq: np.ndarray, layout: Layout, index: int, seed: int, epoch: int):
        self.seq, self.layout, self.index, self.seed, self.epoch = seq, layout, index, seed, epoch
        self.m = seg_len(seq)
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

    def slot_segs(self, rank: int, worker: int) -> np.ndarray:
        v0, batches, _ = self.slot(rank, worker)
        return seg_slice(self.seq, v0, v0 + batches * self.layout.batch_size)

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
        for r in range(lay.world_size):
            for w in range(lay.workers):
                v0, batches, _ = self.slot(r, w)
                if v0 + batches * b <= self.m:
                    counts = b
                elif v0 >= self.m:
                    counts = 0
                else:
                    order = np.concatenate([o for _, o in self.slot_order(r, w)])
                    counts = (v0 + order < self.m).reshape(batches, b).sum(axis=1)
                total[np.arange(batches) * lay.workers + w] += counts  # slot batch k is its rank's batch k*W+w
        return {n: int(c) for n, c in enumerate(total) if c < full}

    def block_perm(self, slot: int, block: int, length: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, self.index, slot, block])
        return rng.permutation(length)

    def remaining(self, n: int) -> np.ndarray:
        """Positions not yet handed out after every rank handed out n batches (padding excluded)."""
        b = self.layout.batch_size
        out = []
        for r in range(self.layout.world_size):
            for w in range(self.layout.workers):
                v0, batches, slot = self.slot(r, w)
                length, done = batches * b, self.consumed(w, n) * b
                if done >= length:
                    continue
                j, start, stop = block_at(self.blocks(batches), done)
                left = np.sort(self.block_perm(slot, j, stop - start)[done - start:]) + start + v0  # virtual indices
                left = left[left < self.m]
                if len(left):
                    out.append(points_to_segs(seg_points(self.seq, left)))
                tail0, tail1 = v0 + stop, min(v0 + length, self.m)
                if tail1 > tail0:
                    out.append(seg_slice(self.seq, tail0, tail1))
        return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


class EpochPlan:
    """Shard order, rotation and layers of one epoch; `layers[-1]` is the one being read."""

    def __init__(self, counts: list[int], seed: int, epoch: int, history: list[tuple[Layout, int]],
                 resampled_samples: int = 0):
        self.epoch = epoch
        rng = np.random.default_rng([seed, epoch, 7])
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
        seq = np.array([[0, self.n]], dtype=np.int64)
        self.layers: list[Layer] = []
        for i, (layout, n) in enumerate(history):
            layer = Layer(seq, layout, i, seed, epoch)
            self.layers.append(layer)
            if i < len(history) - 1:
                seq = layer.remaining(n)

    def locate(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index into the index's list, sample index within that shard) of positions p."""
        q = (p + self.offset) % self.n
        k = np.searchsorted(self.cum, q, "right") - 1
        return self.order[k], q - self.cum[k]
