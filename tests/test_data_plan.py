"""The epoch layout arithmetic (pretrain/data/plan.py) against a direct simulation, over many layouts."""
import numpy as np
import pytest

from pretrain.data.plan import EpochPlan, Layout, seg_points


def worker_positions(layer, rank, worker):
    """Positions a worker yields, in order (what _TrainSlots reads)."""
    _, batches, slot = layer.slot(rank, worker)
    segs = layer.slot_segs(rank, worker)
    length, s = batches * layer.layout.batch_size, layer.layout.shuffle_block
    out = []
    for j in range(0, -(-length // s)):
        block_len = min(s, length - j * s)
        out += list(seg_points(segs, layer.block_perm(slot, j, block_len) + j * s))
    return out


def handed_out(layer, n):
    """Positions of the first n batches of every rank, batch j coming from worker j % W."""
    lay, out = layer.layout, []
    for r in range(lay.world_size):
        per_worker = [worker_positions(layer, r, w) for w in range(lay.workers)]
        taken = [0] * lay.workers
        for j in range(n):
            w = j % lay.workers
            out += per_worker[w][taken[w] * lay.batch_size:(taken[w] + 1) * lay.batch_size]
            taken[w] += 1
    return out


@pytest.mark.parametrize("trial", range(40))
def test_relayouts_cover_the_epoch_exactly_once(trial):
    rng = np.random.default_rng(trial)
    counts = list(rng.integers(1, 40, size=rng.integers(1, 8)))
    n = sum(counts)
    history = []
    b = int(rng.integers(1, 5))
    for _ in range(int(rng.integers(1, 4))):
        history.append((Layout(int(rng.integers(1, 4)), int(rng.integers(1, 4)), b, int(rng.integers(1, 9))), 0))
    seen, padded = [], 0
    for i in range(len(history)):
        plan = EpochPlan(counts, seed=trial, epoch=3, history=history[:i + 1])
        layer = plan.layers[-1]
        if layer.batches_per_rank == 0:
            break
        # a worker's batches are the same whether or not the epoch was cut: each slot is sized exactly
        for r in range(layer.layout.world_size):
            for w in range(layer.layout.workers):
                assert len(worker_positions(layer, r, w)) == layer.slot(r, w)[1] * b
        last = i == len(history) - 1
        stop = layer.batches_per_rank if last else int(rng.integers(0, layer.batches_per_rank + 1))
        seen += handed_out(layer, stop)
        padded += layer.layout.world_size * layer.batches_per_rank * b - layer.m if i > 0 else 0
        history[i] = (history[i][0], stop)
    else:
        first = EpochPlan(counts, seed=trial, epoch=3, history=history[:1]).layers[0]
        kept = first.layout.world_size * first.batches_per_rank * b
        assert set(seen) == set(range(kept))  # every kept sample of the epoch ...
        assert 0 <= len(seen) - kept <= padded  # ... once, repeats only from declared padding
        if padded == 0:
            assert len(seen) == len(set(seen))


def test_epochs_differ_and_tail_rotates():
    a = EpochPlan([10, 7, 13], seed=0, epoch=0, history=[(Layout(2, 2, 4, 5), 0)])
    b = EpochPlan([10, 7, 13], seed=0, epoch=1, history=[(Layout(2, 2, 4, 5), 0)])
    assert a.offset != b.offset or list(a.order) != list(b.order)
    sh, idx = a.locate(np.arange(30))
    assert len(set(zip(sh.tolist(), idx.tolist()))) == 30  # a bijection onto (shard, index) pairs


def test_resampled_window():
    p = EpochPlan([5, 3], seed=1, epoch=2, history=[(Layout(1, 2, 2, 4), 0)], resampled_samples=50)
    assert p.n == 50 and p.layers[0].batches_per_rank == 25
    sh, idx = p.locate(np.arange(50))
    assert all(0 <= i < (5, 3)[s] for s, i in zip(sh.tolist(), idx.tolist()))
