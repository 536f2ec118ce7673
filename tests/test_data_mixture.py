"""Weighted mixtures of sources (data.sources; pretrain/data/mixture.py): proportions, exactly-once per source
across re-layouts and mixture epochs (the plan alone, then real shards through the stream), resume, errors."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from pretrain.config import load_config
from pretrain.config.schema import SourceConfig
from pretrain.data import build_train_stream
from pretrain.data.mixture import BLOCK, Mixture, MixtureWindow
from pretrain.data.plan import EpochPlan, Layout
from pretrain.errors import UserError
from test_data import png, write_shards
from test_data_plan import handed_out

# ----------------------------------------------------------------------------- the plan alone


def read_epoch(mixture, start, n, chain, seed=0):
    """Global positions the real samples of one mixture epoch come from, in the order handed out (step by step,
    rank by rank), after a chain of [(Layout, batches handed out or None: to the end)]; and where the next
    epoch starts (what TrainStream does at an epoch's end)."""
    history, out = [], []
    for i, (lay, stop) in enumerate(chain):
        plan = EpochPlan(None, seed, 0, history + [(lay, 0)], order=MixtureWindow(mixture, start, n))
        layer = plan.layers[-1]
        stop = layer.batches_per_rank if stop is None else min(stop, layer.batches_per_rank)
        got = handed_out(layer, stop)
        out += [start + p for k in range(stop) for r in got for p, ok in got[r][k] if ok]
        history.append((lay, stop))
    first = plan.layers[0]
    return out, start + first.batches_per_rank * first.layout.world_size * first.layout.batch_size


def test_proportions_over_an_epoch_and_every_window():
    """Weights 0.6 / 0.3 / 0.1 over sources of 30,000, 500 and 2,000 samples, an epoch of 10^4 samples read by
    4 ranks x 2 workers in batches of 32 with shuffle blocks of 256: the realised shares are within 1 point of
    the weights over the epoch and within 3 points over every window of 2,000 consecutive samples."""
    weights = [0.6, 0.3, 0.1]
    mixture = Mixture([[1000] * 30, [100] * 5, [500] * 4], weights, seed=3)
    order, _ = read_epoch(mixture, 0, 10_000, [(Layout(4, 2, 32, 256), None)])
    src, _ = mixture.sources(np.array(order))
    assert len(src) == 10_000 // (4 * 32) * 4 * 32
    onehot = np.eye(3)[src]
    assert np.abs(onehot.mean(0) - weights).max() < 0.01
    cum = np.concatenate([np.zeros((1, 3)), np.cumsum(onehot, 0)])
    window = (cum[2000:] - cum[:-2000]) / 2000  # every window of 2,000
    assert np.abs(window - weights).max() < 0.03


def test_block_counts_are_exact_and_spread():
    """Every block holds each source's share to within one sample, cumulatively exact to one sample per source."""
    mixture = Mixture([[7], [5], [9]], [0.5, 0.25, 0.25], seed=0)
    src, rank = mixture.sources(np.arange(10 * BLOCK))
    for i in range(10):
        counts = np.bincount(src[i * BLOCK:(i + 1) * BLOCK], minlength=3)
        assert np.abs(counts - np.array([0.5, 0.25, 0.25]) * BLOCK).max() <= 1
    for s in range(3):  # a source's sequence is read in order, without gap or repeat
        assert (rank[src == s] == np.arange((src == s).sum())).all()
    first = src[:8].tolist()
    assert first.count(0) == 4  # spread within a block: not all of source 0 first


@pytest.mark.parametrize("trial", range(60))
def test_relayouts_read_each_source_sample_once_per_source_epoch(trial):
    """Random mixtures (1-4 sources of random sizes and weights, a random epoch length) read over 3 mixture
    epochs, each through its own random chain of re-layouts (ranks 1-8, workers 1-4, micro-batch 1-5,
    accumulation 1-3, shuffle block) cut at random steps: the global positions read are 0.. without gap or
    repeat, and each source's samples are read in source epochs, each sample once per source epoch (a source
    read past its size repeats; one read partly continues in the next mixture epoch)."""
    rng = np.random.default_rng(trial)
    n_src = int(rng.integers(1, 5))
    counts = [list(rng.integers(1, 15, size=rng.integers(1, 5))) for _ in range(n_src)]
    weights = list(rng.uniform(0.05, 1.0, size=n_src))
    resampled = trial % 4 == 3
    mixture = Mixture(counts, weights, seed=trial, resampled=resampled)
    n = int(rng.integers(20, 150))
    start, read = 0, []
    for _ in range(3):
        while True:  # a first layout the epoch fills one step of (the stream refuses an epoch too small)
            chain = [(Layout(*(int(rng.integers(1, hi)) for hi in (9, 5, 6, 9, 4))), None)
                     for _ in range(rng.integers(1, 4))]
            first = chain[0][0]
            if n >= first.world_size * first.batch_size * first.accum:
                break
        chain = [(lay, int(rng.integers(0, 4)) * lay.accum) for lay, _ in chain[:-1]] + [chain[-1]]
        got, start = read_epoch(mixture, start, n, chain, seed=trial)
        read += got
    assert sorted(read) == list(range(start))  # every position of the 3 epochs once, the next epoch starts after
    src, _ = mixture.sources(np.arange(start))
    shard, intra = mixture.locate(np.arange(start))
    for s in range(n_src):
        samples = list(zip(shard[src == s].tolist(), intra[src == s].tolist()))
        size = sum(counts[s])
        assert all(mixture.first_shard[s] <= sh < mixture.first_shard[s + 1] for sh, _ in samples)
        if resampled:
            continue  # shards drawn with replacement: no once-per-epoch promise
        for e in range(0, len(samples), size):
            chunk = samples[e:e + size]
            assert len(set(chunk)) == len(chunk)  # nothing twice within a source epoch
            if len(chunk) == size:
                assert len(set(chunk)) == size  # a whole source epoch: every sample of the source


# ----------------------------------------------------------------------------- real shards through the stream

A_SIZES, B_SIZES = [7, 13, 3, 21, 9, 17], [5, 11, 7]  # 70 and 23 samples


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Source a: labels 0..69 = sample ids, classes '0'..'69'; source b: labels 0..22, classes 'b0'..'b22'. In
    union mode b's label i becomes 70 + i, so a label names one sample of the mixture."""
    root = tmp_path_factory.mktemp("mixture")
    a = write_shards(str(root / "a"))
    b = write_shards(str(root / "b"), B_SIZES, samples=lambda i: {"png": png(500 + i), "cls": str(i).encode()})
    index = json.load(open(b))
    json.dump({**index, "classes": [f"b{c}" for c in range(23)]}, open(b, "w"))
    return a, b


def mixed(two, rank=0, world=1, *, weights=(0.7, 0.3), labels=True, accum=1, **over):
    base = load_config(None).data
    sources = [SourceConfig(train_urls=u, weight=w, name=n) for u, w, n in zip(two, weights, "ab")]
    data = dataclasses.replace(base, **{"sources": sources, "source_classes": "union", "batch_size": 4,
                                        "workers": 2, "shuffle_block": 5, "samples_per_epoch": 50, **over})
    return build_train_stream(data, rank, world, img_size=16, augment="mae", seed=0, accum=accum, labels=labels)


def test_union_classes_map_labels_by_name(two):
    stream = mixed(two)
    assert stream.num_classes == 93 and stream.index.classes[70:] == [f"b{c}" for c in range(23)]
    labels = [v for _, y in stream.iter_epoch(0) for v in y.tolist()]
    assert len(labels) == len(set(labels)) == 48  # 50 per epoch, 12 batches of 4
    from_b = [v for v in labels if v >= 70]
    assert abs(len(from_b) - 0.3 * 48) <= 2  # b's share, its labels mapped past a's 70 classes
    counts = stream.source_counts()
    assert counts == {"a": {"samples": 48 - len(from_b), "bad": 0}, "b": {"samples": len(from_b), "bad": 0}}


# (world, workers, batch, accum, optimizer steps to take; None: to the epoch's end)
CHAIN = [(2, 2, 3, 1, 2), (3, 1, 2, 2, 1), (1, 0, 4, 1, None)]


def test_stream_relayouts_across_mixture_epochs(two):
    """Three mixture epochs of 50 over a (70 samples, weight 0.7: continues its epoch into the next) and b
    (23 samples, weight 0.3: repeats), each resumed on other ranks, workers, batch sizes and accumulation:
    each epoch's real samples are an uninterrupted run's, and each source's samples are read once per source
    epoch (after t reads of a source of n samples every sample was read floor(t/n) or ceil(t/n) times)."""
    def streams_of(layout, state):
        world, workers, batch, accum, _ = layout
        out = [mixed(two, r, world, accum=accum, workers=workers, batch_size=batch) for r in range(world)]
        for s in out:
            if state:
                s.load_state_dict(state)
        return out

    def real(streams, n, to_end):
        """Real labels of the next n batches of every rank, step by step (to the epoch's end: the stream's
        iterator is run out, as the trainer's is)."""
        got = [list(s.iter_epoch_weighted(epoch)) if to_end else
               [b for _, b in zip(range(n), s.iter_epoch_weighted(epoch))] for s in streams]
        return [v for k in range(n) for g in got
                for v, w in zip(g[k][1].tolist(), g[k][2] if g[k][2] is not None else [1] * len(g[k][1])) if w]

    state, counts = None, np.zeros(93, int)
    for epoch in range(3):
        begin, seen = state, []  # the state an uninterrupted epoch starts from
        stages = CHAIN if epoch != 1 else [CHAIN[1], CHAIN[0], CHAIN[2]]
        for layout in stages:
            streams = streams_of(layout, state)
            left = streams[0].remaining_batches(epoch)
            to_end = layout[4] is None
            seen += real(streams, left if to_end else min(left, layout[4] * layout[3]), to_end)
            state = streams[0].state_dict()
        whole = streams_of(stages[0], begin)
        expected = real(whole, whole[0].remaining_batches(epoch), True)
        assert sorted(seen) == sorted(expected), (epoch, len(seen), len(expected))
        assert state["start"] == whole[0].state_dict()["start"] == (epoch + 1) * 48  # 48 of 50: whole steps
        np.add.at(counts, seen, 1)
        for lo, hi in ((0, 70), (70, 93)):
            reads = counts[lo:hi].sum()
            assert set(counts[lo:hi]) <= {reads // (hi - lo), -(-reads // (hi - lo))}
    assert counts[70:].sum() > 23 and counts[:70].sum() < 2 * 70  # b repeated; a is in its second source epoch


@pytest.mark.parametrize("mode", ["epochs", "resampled"])
def test_resume_mid_epoch_gives_identical_batches(two, mode):
    """Stopped in the second mixture epoch and resumed from its JSON state: the same batches, images included."""
    it = mixed(two, mode=mode)
    list(it.iter_epoch(0))  # epoch 0 whole: epoch 1 starts at 48
    e1 = it.iter_epoch(1)
    head = [next(e1) for _ in range(5)]
    state = json.loads(json.dumps(it.state_dict()))
    resumed = mixed(two, mode=mode)
    resumed.load_state_dict(state)
    rest = list(resumed.iter_epoch(1))
    again = mixed(two, mode=mode)
    list(again.iter_epoch(0))
    uninterrupted = list(again.iter_epoch(1))
    assert len(head) + len(rest) == len(uninterrupted) == 12
    for (x, y), (ux, uy) in zip(head + rest, uninterrupted):
        assert torch.equal(y, uy) and torch.equal(x, ux)  # same samples, same augmentations


def test_what_a_resume_refuses(two):
    stream = mixed(two)
    next(stream.iter_epoch(0))
    state = stream.state_dict()
    assert state["version"] == 2 and [s["name"] for s in state["sources"]] == ["a", "b"]
    with pytest.raises(UserError, match=r"saved reading a \(weight 0.7.*but this run reads a \(weight 0.6.*"
                                        "sources and weights are fixed"):
        mixed(two, weights=(0.6, 0.4)).load_state_dict(state)
    with pytest.raises(UserError, match="version 1, written before mixtures.*this run reads data.sources"):
        mixed(two).load_state_dict({**state, "version": 1})
    with pytest.raises(UserError, match="version 3; this build reads versions 1 and 2"):
        mixed(two).load_state_dict({**state, "version": 3})
    single = build_train_stream(dataclasses.replace(load_config(None).data, train_urls=two[0], workers=0),
                                0, 1, img_size=16, augment="mae", seed=0)
    with pytest.raises(UserError, match=r"saved reading a \(.*but this run reads data.train_urls \(one source\)"):
        single.load_state_dict(state)
    old = {k: v for k, v in single.state_dict().items() if k not in ("sources", "start")}
    single.load_state_dict({**old, "version": 1})  # a state written before mixtures resumes its one source


def test_bad_sources_are_named(two, tmp_path):
    with pytest.raises(UserError, match=r"data.sources\[1\] \('b'\): .*not found"):
        mixed((two[0], str(tmp_path / "none.json")))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"shards": [], "counts": [], "classes": []}))
    with pytest.raises(UserError, match=r"data.sources\[1\] \('b'\)"):
        mixed((two[0], str(empty)))
    with pytest.raises(UserError, match=r"data.sources\[1\] \('b'\) has classes \['b0', .* 23 in all\] but "
                                        r"data.sources\[0\] \('a'\) has .*data.source_classes=union"):
        mixed(two, source_classes="same")
    assert mixed(two, source_classes="same", labels=False).num_classes == 0  # MAE: labels not learnt
    with pytest.raises(UserError, match=r"weight 0.0005 .* below the smallest share"):
        mixed(two, weights=(1.0, 0.0005))
    with pytest.raises(UserError, match=r"config key data.train_urls: .*must be empty when data.sources is set"):
        load_config(None, [f"data.train_urls={two[0]}", f"data.sources=[{{train_urls: {two[1]}}}]"])
    with pytest.raises(UserError, match=r"config key data.sources\[1\].weight: got -1"):
        load_config(None, [f"data.sources=[{{train_urls: {two[0]}}}, {{train_urls: {two[1]}, weight: -1}}]"])
    with pytest.raises(UserError, match=r"unknown config key data.sources\[0\].wieght; did you mean .*weight"):
        load_config(None, [f"data.sources=[{{train_urls: {two[0]}, wieght: 2}}]"])
