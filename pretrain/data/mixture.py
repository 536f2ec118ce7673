"""Weighted mixtures of sources: which source, and which of its samples, each position of a mixture epoch reads.

Each source has its own endless sequence of samples: its epochs one after another, each a `ShardOrder` (its
shards in a seeded order, rotated by a seeded offset; in resampled mode, shards drawn with replacement).
The mixture interleaves those sequences into one global sequence, in blocks of `BLOCK` positions: up to
the end of block i, source s holds floor(i * BLOCK * W_s) - floor(i * BLOCK * W_{s-1}) positions in all
(W_s the cumulative weight share through s), so its share over any run of blocks is its weight's to within
one sample per block, and within a block the sources' positions are spread evenly (the t-th of a source's
n positions sits at (t + 1/2) / n of the block). Global position g of source s is the next sample of that
source's sequence: no randomness is needed here, the sample order inside each source is already shuffled.

A mixture epoch reads the `n` global positions from `start` on, split over ranks and workers by the same
plan as a single source's epoch (plan.py). What an epoch's layers consume is the first layer's whole steps;
the next epoch starts where that ends (the stream carries `start` in its state), so no position is dropped
or read twice: each source's sequence is read in order, without gap or repeat, and each sample of a source
is read once per source epoch, whatever the re-layouts. A source smaller than its share runs through its own
epochs faster than the mixture's; a larger one continues its epoch into the next mixture epoch.
"""
from __future__ import annotations

import numpy as np

from pretrain.data.plan import ShardOrder

BLOCK = 1024
"""Positions per mixture block: a source's share is exact at every block end (to one sample)."""
UNITS = 1 << 16
"""Weight shares are held as integers out of UNITS, so every rank computes the same counts."""
MIN_SHARE = 1 / 1000
"""The smallest weight share: at least one position per block (1024 * 1/1000 > 1)."""


def shares(weights: list[float]) -> np.ndarray:
    """Cumulative weight shares through each source, in units of 1/UNITS (the last is UNITS)."""
    w = np.asarray(weights, dtype=np.float64)
    cum = np.round(np.cumsum(w) / w.sum() * UNITS).astype(np.int64)
    cum[-1] = UNITS
    return cum


class Mixture:
    """The global sequence of a mixture of sources (module docstring). `counts[s]`: samples per shard of source
    s; its shards are numbered after those of the sources before it (`first_shard[s]` on)."""

    CACHE = 256  # blocks and source epochs kept

    def __init__(self, counts: list[list[int]], weights: list[float], seed: int, resampled: bool = False):
        self.counts = [list(c) for c in counts]
        self.sizes = np.array([int(sum(c)) for c in counts], dtype=np.int64)  # samples per source epoch
        self.first_shard = np.concatenate([[0], np.cumsum([len(c) for c in counts])]).astype(np.int64)
        self.cum = shares(weights)
        self.seed, self.resampled = seed, resampled
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._orders: dict[tuple[int, int], ShardOrder] = {}

    def before(self, blocks: np.ndarray) -> np.ndarray:
        """(len(blocks), S) positions each source holds before each block."""
        through = np.asarray(blocks, dtype=np.int64)[:, None] * BLOCK * self.cum[None, :] // UNITS
        return np.diff(through, axis=1, prepend=0)

    def block(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, index in the source's sequence) of each position of block i."""
        got = self._blocks.get(i)
        if got is None:
            base = self.before(np.array([i, i + 1]))
            n = base[1] - base[0]
            keys = np.concatenate([(np.arange(c) + 0.5) / c for c in n if c])
            src = np.repeat(np.arange(len(n)), n)
            rank = np.concatenate([np.arange(c) for c in n]) + base[0][src]
            o = np.argsort(keys, kind="stable")  # ties: the earlier source first
            got = src[o], rank[o]
            if len(self._blocks) >= self.CACHE:
                self._blocks.clear()
            self._blocks[i] = got
        return got

    def sources(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index in that source's endless sequence) of global positions g."""
        g = np.asarray(g, dtype=np.int64)
        src, q = np.empty_like(g), np.empty_like(g)
        blocks, at = np.divmod(g, BLOCK)
        for i in np.unique(blocks):
            sel = blocks == i
            s, r = self.block(int(i))
            src[sel], q[sel] = s[at[sel]], r[at[sel]]
        return src, q

    def order(self, source: int, epoch: int) -> ShardOrder:
        """Source `source`'s epoch `epoch`: its shards' order (its own key, apart from a single source's)."""
        got = self._orders.get((source, epoch))
        if got is None:
            size = int(self.sizes[source]) if self.resampled else 0
            got = ShardOrder(self.counts[source], [self.seed, epoch, 11, source], size)
            if len(self._orders) >= self.CACHE:
                self._orders.clear()
            self._orders[(source, epoch)] = got
        return got

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index into every source's shards in turn, sample index within that shard) of global positions g."""
        src, q = self.sources(g)
        epoch, p = np.divmod(q, self.sizes[src])
        shard, intra = np.empty_like(q), np.empty_like(q)
        for s, e in np.unique(np.stack([src, epoch]), axis=1).T.tolist():
            sel = (src == s) & (epoch == e)
            sh, shard_i = self.order(s, e).locate(p[sel])
            shard[sel], intra[sel] = sh + self.first_shard[s], shard_i
        return shard, intra


class MixtureWindow:
    """A mixture epoch's positions: global positions start .. start + n - 1 (an `EpochPlan` order)."""

    def __init__(self, mixture: Mixture, start: int, n: int):
        self.mixture, self.start, self.n = mixture, start, n

    def locate(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.mixture.locate(np.asarray(p, dtype=np.int64) + self.start)
