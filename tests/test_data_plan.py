"""The epoch layout arithmetic (pretrain/data/plan.py) against a direct simulation, over many layouts."""
import hashlib

import numpy as np
import pytest

from pretrain.data.plan import EpochPlan, Layout, block_starts


def worker_positions(layer, rank, worker):
    """(position, real) of the samples a worker yields, in order (what _TrainSlots reads); real is False
    for padding."""
    v0, _, _ = layer.slot(rank, worker)
    out = []
    for _, order in layer.slot_order(rank, worker):
        out += zip(layer.points(v0 + order).tolist(), (v0 + order < layer.m).tolist())
    return out


def handed_out(layer, n):
    """{rank: (position, real) of its first n batches}, batch j of a rank coming from worker j % W."""
    lay, out = layer.layout, {}
    for r in range(lay.world_size):
        per_worker = [worker_positions(layer, r, w) for w in range(lay.workers)]
        taken, out[r] = [0] * lay.workers, []
        for j in range(n):
            w = j % lay.workers
            out[r].append(per_worker[w][taken[w] * lay.batch_size:(taken[w] + 1) * lay.batch_size])
            taken[w] += 1
    return out


@pytest.mark.parametrize("trial", range(60))
def test_relayouts_learn_every_sample_exactly_once(trial):
    """Random chains of re-layouts (ranks 1-8, workers 1-4, micro-batch 1-5, accumulation 1-3, shuffle block,
    block ramp, resampled or not), each cut at a random optimizer step: the real samples handed out over the chain are
    the epoch's kept samples, each exactly once; every rank gets the same whole steps; the plan's per-batch
    real counts (what the trainer averages a ragged step over) match what was handed out."""
    rng = np.random.default_rng(trial)
    counts = list(rng.integers(1, 40, size=rng.integers(1, 8)))
    resampled = int(rng.integers(20, 200)) if trial % 4 == 3 else 0
    history = [(Layout(int(rng.integers(1, 9)), int(rng.integers(1, 5)), int(rng.integers(1, 6)),
                       int(rng.integers(1, 9)), int(rng.integers(1, 4)), bool(rng.integers(0, 4))), 0)
               for _ in range(int(rng.integers(1, 5)))]  # ramp off in 1 of 4: states saved before it existed
    seen = []
    for i in range(len(history)):
        plan = EpochPlan(counts, seed=trial, epoch=3, history=history[:i + 1], resampled_samples=resampled)
        layer, lay = plan.layers[-1], history[i][0]
        if i == 0 and layer.batches_per_rank == 0:
            return  # an epoch too small for one step of this layout (the stream refuses it)
        assert layer.batches_per_rank % lay.accum == 0
        for r in range(lay.world_size):  # each slot is sized exactly, whether or not the epoch is cut
            for w in range(lay.workers):
                assert len(worker_positions(layer, r, w)) == layer.slot(r, w)[1] * lay.batch_size
        last = i == len(history) - 1
        stop = layer.batches_per_rank if last else int(rng.integers(0, layer.batches_per_rank // lay.accum + 1)) * lay.accum
        got = handed_out(layer, stop)
        short = layer.short_batches()
        for n in range(stop):
            real = sum(sum(ok for _, ok in got[r][n]) for r in got)
            assert real == short.get(n, lay.world_size * lay.batch_size)
        seen += [p for r in got for batch in got[r] for p, ok in batch if ok]
        history[i] = (lay, stop)
    first = EpochPlan(counts, seed=trial, epoch=3, history=history[:1], resampled_samples=resampled).layers[0]
    kept = first.layout.world_size * first.batches_per_rank * first.layout.batch_size
    assert sorted(seen) == list(range(kept))  # every kept sample of the epoch, exactly once


def test_epochs_differ_and_tail_rotates():
    a = EpochPlan([10, 7, 13], seed=0, epoch=0, history=[(Layout(2, 2, 4, 5), 0)])
    b = EpochPlan([10, 7, 13], seed=0, epoch=1, history=[(Layout(2, 2, 4, 5), 0)])
    assert a.order.offset != b.order.offset or list(a.order.order) != list(b.order.order)
    sh, idx = a.locate(np.arange(30))
    assert len(set(zip(sh.tolist(), idx.tolist()))) == 30  # a bijection onto (shard, index) pairs


def test_resampled_window():
    p = EpochPlan([5, 3], seed=1, epoch=2, history=[(Layout(1, 2, 2, 4), 0)], resampled_samples=50)
    assert p.n == 50 and p.layers[0].batches_per_rank == 25
    sh, idx = p.locate(np.arange(50))
    assert all(0 <= i < (5, 3)[s] for s, i in zip(sh.tolist(), idx.tolist()))


def test_blocks_grow_from_one_batch_to_the_shuffle_block():
    """A worker's first batch needs one batch of samples read; blocks double up to the shuffle block and
    tile the slot exactly (without the ramp: whole blocks, as states saved before it had)."""
    starts = block_starts(1000, 8, 100)
    assert list(np.diff(starts)) == [8, 16, 32, 64] + [100] * 8 + [80]
    assert starts[0] == 0 and starts[-1] == 1000
    assert list(np.diff(block_starts(250, 8, 100, ramp=False))) == [100, 100, 50]
    assert list(np.diff(block_starts(20, 64, 16))) == [16, 4]  # a block smaller than a batch never grows past it
    assert len(block_starts(0, 8, 100)) == 1


def test_saved_states_keep_their_meaning():
    """A state holds only layouts and batch counters, so the plan must map them to the samples it always did:
    these chains (padding, accumulation, no ramp, resampled) yield what the plan that listed every remaining
    segment yielded (its digest recorded at commit a80efb4), slot by slot, padding flags and ragged counts
    included."""
    chains = [  # (shard counts, resampled window, [(Layout args, batches handed out), ...])
        ([37, 5, 19, 40, 2], 0, [((3, 2, 4, 7, 1), 4), ((2, 3, 5, 9, 2), 2), ((5, 1, 3, 6, 1), 0)]),
        ([11, 30, 25], 90, [((2, 4, 2, 5, 3, True), 6), ((4, 2, 7, 4, 1, False), 1), ((1, 3, 4, 16, 2), 0)]),
        ([64] * 6, 0, [((4, 3, 3, 8, 1, False), 9), ((3, 2, 5, 8, 1), 0)]),
    ]
    h = hashlib.sha256()
    for counts, resampled, chain in chains:
        history = [(Layout(*args), n) for args, n in chain]
        for i in range(len(history)):
            layer = EpochPlan(counts, seed=5, epoch=1, history=history[:i + 1], resampled_samples=resampled).layers[-1]
            for r in range(layer.layout.world_size):
                for w in range(layer.layout.workers):
                    v0, _, _ = layer.slot(r, w)
                    for _, order in layer.slot_order(r, w):
                        h.update(layer.points(v0 + order).astype(np.int64).tobytes())
                        h.update((v0 + order < layer.m).tobytes())
            h.update(repr(sorted(layer.short_batches().items())).encode())
    assert h.hexdigest()[:16] == "66c85338a4ff19b8"


def test_a_rank_computes_only_the_blocks_its_slots_read():
    """After a re-layout at scale the plan holds O(slots) integers: building it and locating one rank's first
    blocks sorts out the untaken part of only the few old blocks those read (1,024 old slots here)."""
    counts = [1000] * 500
    half = EpochPlan(counts, 0, 0, [(Layout(128, 8, 32, 256), 0)]).layers[0].batches_per_rank // 2
    plan = EpochPlan(counts, 0, 0, [(Layout(128, 8, 32, 256), half), (Layout(64, 4, 48, 256), 0)])
    layer, rest = plan.layers[-1], plan.layers[-1].seq
    assert len(rest.cum) == 128 * 8 + 1 and not rest._cache  # nothing per sample yet
    v0, _, _ = layer.slot(5, 2)
    got = layer.points(v0 + np.arange(256))
    assert 0 < len(rest._cache) <= 3
    assert len(np.unique(got)) == 256
