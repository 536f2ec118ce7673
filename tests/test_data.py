"""The train/eval streams on real tar shards with real DataLoader workers; 2 ranks simulated as two streams."""
import dataclasses
import io
import json
import os

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from pretrain.config import load_config
from pretrain.data import build_eval_stream, build_train_stream, normalize, read_index
from pretrain.errors import UserError

SIZES = [7, 13, 3, 21, 9, 17]  # uneven shards, 70 samples


def png(i: int, side: int = 8) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_shards(root: str, sizes=SIZES, samples=None, num_classes=None) -> str:
    """Shards whose label is the sample id (so tests can tell samples apart after augmentation)."""
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(path, exist_ok=True)
    names, i = [], 0
    for s, n in enumerate(sizes):
        name = f"train-{s:06d}.tar"
        with fs.open(f"{path}/{name}", "wb") as f:
            w = TarWriter(f, encoder=False)
            for _ in range(n):
                sample = samples(i) if samples else {"png": png(i), "cls": str(i).encode()}
                w.write({"__key__": f"s{i:05d}", **sample})
                i += 1
            w.close()
        names.append(name)
    classes = [str(c) for c in range(num_classes or i)]
    with fs.open(f"{path}/train.json", "w") as f:
        json.dump({"shards": names, "counts": list(sizes), "classes": classes}, f)
    return f"{root.rstrip('/')}/train.json"


def make_data(urls, **over):
    """The data settings of these tests (small batches and blocks, 2 workers), `over` on top."""
    return dataclasses.replace(load_config(None).data, **{"train_urls": urls, "batch_size": 4, "workers": 2,
                                                          "shuffle_block": 5, **over})


def train_stream(urls, rank=0, world=1, *, augment="mae", accum=1, **over):
    """A train stream of 16 px images (seed 0) on `make_data(urls, **over)`."""
    return build_train_stream(make_data(urls, **over), rank, world, img_size=16, augment=augment, seed=0, accum=accum)


def labels_of(stream, epoch, limit=None):
    out = []
    for _, y in stream.iter_epoch(epoch):
        out.append(y.tolist())
        if limit is not None and len(out) == limit:
            break
    return out


def flat(batches):
    return [v for b in batches for v in b]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")))


def test_read_index_forms(shards):
    base = os.path.dirname(shards)
    by_index = read_index(shards)
    assert by_index.counts == SIZES and len(by_index.classes) == 70
    by_brace = read_index(f"{base}/train-{{000000..000005}}.tar")
    by_glob = read_index(f"{base}/train-*.tar")
    assert by_brace.shards == by_glob.shards == by_index.shards
    assert by_glob.counts == SIZES  # found through the folder's index
    assert sum(read_index([f"{base}/train-000000.tar", f"{base}/train-000001.tar"]).counts) == 20
    with pytest.raises(UserError, match="matched no files"):
        read_index(f"{base}/nothing-*.tar")
    with pytest.raises(UserError, match="matched no files"):  # a brace pattern of absent local files
        read_index(f"{base}/nothing-{{000..003}}.tar")
    with pytest.raises(UserError, match="1 of 7 shards .* do not exist, e.g. .*train-000006.tar"):
        read_index(f"{base}/train-{{000000..000006}}.tar")


def test_exactly_once_two_ranks_two_workers(shards):
    streams = [train_stream(shards, r, 2) for r in range(2)]
    assert streams[0].batches_per_epoch == streams[1].batches_per_epoch == 70 // 8
    per_rank = [labels_of(s, 0) for s in streams]
    assert [len(b) for b in per_rank] == [8, 8]  # equal batch counts per rank
    assert all(len(b) == 4 for r in per_rank for b in r)
    seen = flat(per_rank[0]) + flat(per_rank[1])
    assert len(seen) == len(set(seen)) == 64 and set(seen) <= set(range(70))
    again = flat(labels_of(train_stream(shards, 0, 2), 0))
    assert again == flat(per_rank[0])  # deterministic
    assert flat(labels_of(streams[0], 1)) != flat(per_rank[0])  # a new order each epoch


@pytest.mark.parametrize("world,rank,workers,stop", [(2, 1, 2, 3), (1, 0, 3, 4)])
def test_resume_same_layout_gives_identical_batches(shards, world, rank, workers, stop):
    # (1, 0, 3, 4): 17 batches over 3 workers (6, 6, 5), stopped mid-round: the round-robin must resume in order
    def stream():
        return train_stream(shards, rank, world, augment="train", auto_augment="rand-m9-mstd0.5", workers=workers,
                            reprob=0.25)

    full = list(stream().iter_epoch(0))
    first = stream()
    it = first.iter_epoch(0)
    head = [next(it) for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON types
    resumed = stream()
    resumed.load_state_dict(state)
    rest = list(resumed.iter_epoch(0))
    assert len(head) + len(rest) == len(full)
    for (x, y), (fx, fy) in zip(head + rest, full):
        assert torch.equal(y, fy) and torch.equal(x, fx)  # same samples and same augmentations
    assert resumed.state_dict()["epoch"] == 1


@pytest.mark.parametrize("new_world,new_workers", [(1, 2), (2, 1), (1, 3)])
def test_resume_other_layout_exactly_once(shards, new_world, new_workers):
    streams = [train_stream(shards, r, 2) for r in range(2)]
    consumed = flat(labels_of(streams[0], 0, limit=3)) + flat(labels_of(streams[1], 0, limit=3))
    state = streams[0].state_dict()
    assert state == streams[1].state_dict()  # rank-independent: one copy in the checkpoint suffices
    rest = []
    for r in range(new_world):
        s = train_stream(shards, r, new_world, workers=new_workers)
        s.load_state_dict(state)
        rest += flat(labels_of(s, 0))
    whole = flat(labels_of(train_stream(shards, 0, 2), 0)) + flat(labels_of(train_stream(shards, 1, 2), 0))
    assert sorted(consumed + rest) == sorted(whole)  # every sample of the epoch exactly once


def test_resume_twice_across_layouts(shards):
    a = [train_stream(shards, r, 2) for r in range(2)]
    seen = flat(labels_of(a[0], 0, 2)) + flat(labels_of(a[1], 0, 2))
    b = train_stream(shards, workers=1)
    b.load_state_dict(a[0].state_dict())
    seen += flat(labels_of(b, 0, 4))  # leaves 32 samples: 4 batches on each of 2 ranks, no padding
    c = [train_stream(shards, r, 2) for r in range(2)]
    for s in c:
        s.load_state_dict(b.state_dict())
    assert c[0].remaining_batches(0) == c[1].remaining_batches(0)
    seen += flat(labels_of(c[0], 0)) + flat(labels_of(c[1], 0))
    fresh = [train_stream(shards, r, 2) for r in range(2)]
    assert sorted(seen) == sorted(flat(labels_of(fresh[0], 0)) + flat(labels_of(fresh[1], 0)))


def test_resampled_mode_and_resume(shards):
    def stream():
        return train_stream(shards, mode="resampled", samples_per_epoch=40)

    s = stream()
    assert s.num_samples == 40 and s.batches_per_epoch == 10
    full = labels_of(s, 3)
    assert len(full) == 10
    t = stream()
    head = labels_of(t, 3, limit=4)
    u = stream()
    u.load_state_dict(t.state_dict())
    assert head + labels_of(u, 3) == full


def test_eval_stream_every_sample_once_no_drop(shards):
    seen = []
    for r in range(2):
        for x, y in build_eval_stream(shards, make_data(shards), r, 2, img_size=16):
            assert x.dtype == torch.uint8 and x.shape[1:] == (3, 16, 16)
            seen += y.tolist()
    assert sorted(seen) == list(range(70))


def test_pipe_urls(shards):
    base = os.path.dirname(shards)
    s = train_stream(f"pipe:cat {base}/train-{{000000..000001}}.tar", workers=0)  # non-seekable streams: counted and skipped by reading forward
    assert s.num_samples == 20 and sorted(flat(labels_of(s, 0))) == list(range(20))


def test_memory_filesystem_and_glob_without_index():
    root = "memory://wds-test"
    write_shards(root, sizes=[6, 10])
    fs = fsspec.filesystem("memory")
    fs.rm("/wds-test/train.json")
    idx = read_index(f"{root}/train-*.tar")
    assert len(idx.shards) == 2 and idx.counts is None
    s = train_stream(f"{root}/train-{{000000..000001}}.tar", batch_size=2)  # counts from tar headers, workers read memory:// after fork
    got = flat(labels_of(s, 0))
    assert len(got) == 16 and len(set(got)) == 16 and s.num_classes == 0


def bad_samples(i: int) -> dict:
    good = {"png": png(i), "cls": str(i % 10).encode()}
    return {
        3: {"txt": b"hello", "cls": b"3"},                       # not an image
        8: {"png": b"", "cls": b"8"},                            # zero-byte image
        13: {"jpg": b"\xff\xd8\xff garbage", "cls": b"3"},       # undecodable
        17: {"png": png(17)},                                    # label missing
        21: {"png": png(21), "cls": b"99"},                      # label out of range
    }.get(i, good)


def test_bad_data_skipped_counted_and_fatal_past_fraction(tmp_path):
    index = write_shards(str(tmp_path), sizes=[12, 12, 12], samples=bad_samples, num_classes=10)
    last = tmp_path / "train-000002.tar"
    data = last.read_bytes()
    last.write_bytes(data[:len(data) // 2])  # truncated tar: about half of its 12 samples are gone
    s = train_stream(index, max_bad_fraction=0.5)
    batches = list(s.iter_epoch(0))
    assert len(batches) == s.batches_per_epoch == 9 and all(len(y) == 4 for _, y in batches)
    bad = s.bad_counts()
    assert {k: bad.get(k) for k in ("not_image", "empty_image", "undecodable", "label_missing",
                                     "label_out_of_range")} == dict.fromkeys(
        ("not_image", "empty_image", "undecodable", "label_missing", "label_out_of_range"), 1)
    assert 4 <= bad["truncated"] <= 8
    strict = train_stream(index, max_bad_fraction=0.0)
    with pytest.raises(UserError, match="max_bad_fraction"):
        list(strict.iter_epoch(0))


@pytest.mark.parametrize("workers", [0, 2])
def test_unreachable_shard_reported_by_name(tmp_path, monkeypatch, workers):
    import pretrain.data.index as index_mod

    monkeypatch.setattr(index_mod, "OPEN_BACKOFF_S", 0.01)
    index = write_shards(str(tmp_path), sizes=[4, 4])
    os.remove(tmp_path / "train-000001.tar")
    s = train_stream(index, workers=workers, batch_size=2)
    with pytest.raises(UserError, match="unreachable after 4 tries: .*train-000001.tar") as err:
        list(s.iter_epoch(0))
    assert "\n" not in str(err.value)  # one line, also when raised in a worker process


def test_state_from_other_shards_rejected(shards, tmp_path):
    other = write_shards(str(tmp_path), sizes=[5, 5])
    s = train_stream(other, batch_size=2)
    with pytest.raises(UserError, match="num_samples"):
        s.load_state_dict(train_stream(shards).state_dict())
    with pytest.raises(UserError, match="data state has version 0; this build reads versions 1 and 2"):
        s.load_state_dict({**s.state_dict(), "version": 0})


def test_streams_satisfy_the_trainer_interface(shards):
    """The trainer reads a BatchStream: the stream of shards and the in-memory stream of the tests both are one."""
    from pretrain.bench.step import MemoryStream
    from pretrain.data import BatchStream

    assert isinstance(train_stream(shards), BatchStream)
    assert isinstance(MemoryStream(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2), 1), BatchStream)
    with pytest.raises(ValueError, match="augmentation mode 'supervised'"):
        train_stream(shards, augment="supervised")


def test_normalize_on_device():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = normalize(x, [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    assert y.dtype == torch.float32 and torch.allclose(y[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_draft_decoding_matches_output_size(tmp_path):
    """Large JPEGs take the reduced-size decode path and still give exact output sizes (train and eval)."""
    from pretrain.data.transforms import Decoder

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(buf, "JPEG")
    for mode in ("train", "mae", "eval"):
        out = Decoder(mode, 16, make_data("x"))({"jpg": buf.getvalue(), "cls": b"1"})
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def _photo_like(h=600, w=800) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 128 + 60 * np.sin(xx / 37.0)[..., None] * np.cos(yy / 23.0)[..., None] * np.array([1.0, 0.6, -0.8])
    return np.clip(img, 0, 255).astype(np.uint8)


def test_reduced_size_decode_only_when_the_crop_allows():
    from pretrain.data.transforms import crop_resize, decode_for_crop

    buf = io.BytesIO()
    Image.fromarray(_photo_like()).save(buf, "JPEG", quality=95)
    whole = lambda w, h: (0, 0, w, h)  # noqa: E731
    arr, box = decode_for_crop(buf.getvalue(), whole, 64)  # 600 px / 8 = 75 >= 64: 1/8-scale decode
    assert arr.shape[:2] == (75, 100) and box == (0, 0, 100, 75)
    arr_full, _ = decode_for_crop(buf.getvalue(), whole, 400)  # 600 / 2 = 300 < 400: full decode
    assert arr_full.shape[:2] == (600, 800)
    small = crop_resize(arr, box, 64, "bilinear").astype(float)
    ref = np.asarray(Image.open(buf).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)).astype(float)
    assert np.abs(small - ref).mean() < 1.5  # same picture as a full decode + resize (a 4 px shift: ~7)


def test_eval_transform_matches_timm():
    """Our one-step centre crop equals timm's eval transform (resize shorter side, centre crop) to rounding."""
    import pretrain._compat  # noqa: F401
    from timm.data import create_transform

    from pretrain.data.transforms import Decoder

    img = Image.fromarray(_photo_like(300, 400))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    data = make_data("x")
    ours = Decoder("eval", 64, data)({"png": buf.getvalue()}).astype(float)
    tf = create_transform(64, is_training=False, crop_pct=data.eval_crop_pct, interpolation="bicubic",
                          use_prefetcher=True)
    ref = tf(img).permute(1, 2, 0).numpy().astype(float)
    assert ours.shape == ref.shape and np.abs(ours - ref).mean() < 3.5  # a 4 px shift gives ~9.6


def test_randaugment_at_full_magnitude_decodes():
    """RandAugment's increasing posterize at magnitude 10 keeps 0 bits: a black image, not Pillow's error
    (the DeiT / MAE fine-tune recipes' rand-m9-mstd0.5-inc1 reaches 10 in ~2% of its draws)."""
    from pretrain.data.transforms import Decoder

    decoder = Decoder("train", 16, make_data("x", auto_augment="rand-m10-mstd0-inc1-n2"))
    ops = {op.name: op for t in decoder.secondary.transforms for op in getattr(t, "ops", [])}
    posterize = ops["PosterizeIncreasing"]
    posterize.prob = 1.0
    img = Image.fromarray(np.random.default_rng(0).integers(1, 255, (16, 16, 3), dtype=np.uint8))
    assert not np.asarray(posterize(img)).any()
    decoder.secondary.transforms[0].ops = [posterize]  # every draw now posterizes at 0 bits
    out = decoder({"png": png(3, side=16)})
    assert out.shape == (16, 16, 3)


WORKERS_SIGNALLED = """
import multiprocessing, subprocess, sys
from tests.test_data import flat, train_stream
stream = train_stream(sys.argv[1])
epoch = stream.iter_epoch(0)
got = [next(epoch)[1].tolist()]
workers = [str(p.pid) for p in multiprocessing.active_children()]
assert len(workers) == 2, workers
for sig in ("TERM", "USR1"):  # sent by another process, as slurmstepd does to every process of a step
    subprocess.run(["kill", f"-{sig}", *workers], check=True)
got += [y.tolist() for _, y in epoch]
print(flat(got), flush=True)
LEFT_RUNNING = stream.iter_epoch(1)  # the interpreter exits with live workers blocked in their queues
next(LEFT_RUNNING)
"""


def test_workers_survive_slurm_signals_and_end_with_the_process(shards):
    """SLURM sends a pre-emption SIGTERM/SIGUSR1 to the data workers too: the epoch must go on (the trainer
    checkpoints), and the process must still exit promptly with workers that ignore SIGTERM."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", WORKERS_SIGNALLED, shards], capture_output=True, text=True,
                          timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(flat(labels_of(train_stream(shards), 0))), proc.stdout


RAGGED: list = []


def _take(streams, epoch, n):
    """Real (weight 1) labels of the next n batches of every rank's stream, checking that each ragged step's
    `real` is the count of weight-1 samples over its ranks and micro-batches."""
    got = [list(zip(range(n), s.iter_epoch_weighted(epoch))) for s in streams]
    accum = streams[0].layout.accum
    labels = []
    for i in range(0, n, accum):
        step = [b for g in got for _, b in g[i:i + accum]]
        RAGGED.append(step[0][3] is not None)
        reals = {b[3] for b in step}
        assert len(reals) == 1  # every rank and micro-batch of a step agrees on its normaliser
        counted = sum(len(b[1]) if b[2] is None else int(b[2].sum()) for b in step)
        assert reals.pop() in (None, counted) and (counted == sum(len(b[1]) for b in step)) == (step[0][3] is None)
        labels += [v for b in step for v, w in zip(b[1].tolist(), (b[2] if b[2] is not None else [1] * len(b[1])))
                   if w]
    return labels


# (world, workers, batch, accum, optimizer steps to take; None: to the epoch's end)
CHAINS = [
    [(2, 2, 4, 1, 3), (3, 1, 3, 2, 2), (1, 0, 5, 1, None)],
    [(1, 3, 2, 3, 2), (4, 2, 3, 1, 1), (2, 1, 4, 2, 1), (3, 0, 2, 2, None)],
    [(3, 1, 5, 1, 2), (2, 2, 4, 1, None)],
]


@pytest.mark.parametrize("chain", CHAINS, ids=["2-3-1", "1-4-2-3", "3-2"])
@pytest.mark.parametrize("mode", ["epochs", "resampled"])
def test_relayout_chains_learn_each_sample_exactly_once(shards, chain, mode):
    """Resumed on other ranks, workers, micro-batch sizes and accumulation at random points of an epoch, then
    again in the next: each epoch's real samples are those of an uninterrupted run, each exactly once."""
    def streams_of(layout, state):
        world, workers, batch, accum, _ = layout
        extra = {"samples_per_epoch": 61} if mode == "resampled" else {}
        out = [train_stream(shards, r, world, accum=accum, workers=workers, batch_size=batch, mode=mode, **extra)
               for r in range(world)]
        for s in out:
            if state:
                s.load_state_dict(state)
        return out

    state = None
    RAGGED.clear()
    for epoch, stages in ((0, chain), (1, chain[::-1])):
        seen = []
        for layout in stages:
            streams = streams_of(layout, state)
            left = streams[0].remaining_batches(epoch)
            n = left if layout[4] is None else min(left, layout[4] * layout[3])
            seen += _take(streams, epoch, n)
            if layout[4] is None:
                assert all(s.remaining_batches(epoch) == 0 for s in streams)
            state = streams[0].state_dict()
        whole = streams_of(stages[0], {"epoch": epoch, "layers": [], **{k: state[k] for k in state
                                                                           if k not in ("epoch", "layers")}})
        expected = _take(whole, epoch, whole[0].remaining_batches(epoch))
        assert sorted(seen) == sorted(expected)  # the same multiset (resampled mode draws shards with replacement)
        assert mode == "resampled" or len(set(expected)) == len(expected)
        state = {**state, "epoch": epoch + 1, "layers": []}
    assert any(RAGGED)  # the chain did leave ragged steps (the weights were exercised)


def test_workers_persist_across_epochs_and_serve_each_epoch(shards):
    """Workers are forked once and serve every epoch: the same worker processes read epoch 0 and epoch 2, and
    epoch 2 is the epoch a fresh stream starting there gets (the shared epoch reaches the workers)."""
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}  # left by earlier tests, if any
    stream = train_stream(shards)
    pids, epochs = [], []
    for epoch in range(3):
        it = stream.iter_epoch(epoch)
        epochs.append([next(it)[1].tolist()])
        pids.append(sorted(p.pid for p in multiprocessing.active_children() if p.pid not in before))
        epochs[-1] += [y.tolist() for _, y in it]
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]
    assert epochs[0] != epochs[2]
    fresh = train_stream(shards)
    fresh.load_state_dict({**stream.state_dict(), "epoch": 2, "layers": []})
    assert labels_of(fresh, 2) == epochs[2]
    stream.close()
    assert not [p for p in multiprocessing.active_children() if p.pid in pids[0]]


def test_first_batch_reads_one_batch_not_a_block(shards, monkeypatch):
    """With a shuffle block far larger than a batch, the first batch of an epoch is decoded after reading one
    batch of samples (the blocks ramp up from one batch)."""
    from pretrain.data import loading as stream_mod

    reads = []
    get = stream_mod.Reader.get
    monkeypatch.setattr(stream_mod.Reader, "get", lambda self, shard, i: reads.append(i) or get(self, shard, i))
    stream = train_stream(shards, workers=0, shuffle_block=64)
    it = stream.iter_epoch(0)
    next(it)
    assert len(reads) == 4
    rest = [y.tolist() for _, y in it]
    assert len(reads) == 4 * (1 + len(rest))  # every sample read once


def test_shuffle_block_capped_in_bytes_by_the_index(tmp_path):
    """`vit-pretrain shards` records each shard's bytes; data.shuffle_mb lowers the block so that its raw
    samples fit, and 0 lifts the cap."""
    from pretrain.data.writer import write_shards as write

    got = write("synthetic:120", str(tmp_path), samples_per_shard=40)
    idx = read_index(f"{tmp_path}/train.json")
    assert idx.sizes == [os.path.getsize(s) for s in idx.shards]
    mean = sum(idx.sizes) / sum(idx.counts)
    urls = got["splits"]["train"]["index"]
    capped = train_stream(urls, shuffle_block=4096, shuffle_mb=1)
    assert capped.layout.shuffle_block == int(2**20 // mean) < 4096
    free = train_stream(urls, shuffle_block=4096, shuffle_mb=0)
    assert free.layout.shuffle_block == 4096
