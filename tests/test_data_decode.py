"""data.decode: the split (workers draw crops and flips, the main process decodes, crops, resizes and flips) on
real shards with real DataLoader workers, against the CPU path; its refusals and `auto`. On the CPU the split
decodes with simplejpeg/PIL; tests/test_gpu_decode.py compares nvJPEG's batches with the CPU path's."""
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from conftest import REPO, metrics_rows, run_cli
from pretrain.config import load_config
from pretrain.data import build_train_stream
from pretrain.errors import UserError

TINY_MAE = str(REPO / "configs/pretrain/mae_tiny_cpu.yaml")
CPU = torch.device("cpu")
PNGS = (5, 17, 30)  # samples stored as PNG: the split decodes them by the CPU fallback


def _photo(i: int) -> np.ndarray:
    """A smooth, photo-like image of its own size (90-260 px a side): crops of it decode at DCT-reduced scale on
    the CPU path."""
    rng = np.random.default_rng(i)
    h, w = (int(v) for v in rng.integers(90, 260, 2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    wave = np.sin(xx / rng.uniform(15, 40))[..., None] * np.cos(yy / rng.uniform(15, 40))[..., None]
    img = 128 + 60 * wave * rng.uniform(-1, 1, 3) + rng.normal(0, 2, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """40 JPEGs (3 PNGs) written by `vit-pretrain shards`' writer from a list whose label is the sample id."""
    from pretrain.data.writer import write_shards

    root = tmp_path_factory.mktemp("decode")
    rows = []
    for i in range(40):
        path = root / f"img{i}.{'png' if i in PNGS else 'jpg'}"
        Image.fromarray(_photo(i)).save(path, quality=90)
        rows.append(f"{path},{i}")
    (root / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    write_shards(str(root / "list.csv"), str(root / "out"), samples_per_shard=10)
    return str(root / "out/train.json")


def _stream(urls, augment="mae", decode_device=None, **over):
    data = dataclasses.replace(load_config(None).data, **{"train_urls": urls, "batch_size": 4, "workers": 2,
                                                          "shuffle_block": 5, **over})
    return build_train_stream(data, 0, 1, img_size=16, augment=augment, seed=0, decode_device=decode_device)


def _epoch(stream, limit=None):
    out = []
    for x, y in stream.iter_epoch(0):
        out.append((x, y))
        if len(out) == limit:
            break
    return out


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.mark.parametrize("augment", ["mae", "train"])
def test_split_gives_the_cpu_paths_samples_crops_flips_and_order(shards, augment):
    cpu, split = _epoch(_stream(shards, augment)), _epoch(_stream(shards, augment, CPU))
    assert [y.tolist() for _, y in split] == [y.tolist() for _, y in cpu]  # labels are the sample ids
    assert {v for _, y in split for v in y.tolist()} >= set(PNGS)  # the PNGs are in it, not skipped
    flips_tell = 0
    for (xc, _), (xs, _) in zip(cpu, split):
        assert xs.shape == xc.shape == (4, 3, 16, 16) and xs.dtype == torch.uint8 and xs.device == CPU
        assert _mean_abs(xs, xc) < 2.0  # the CPU path decoded at DCT-reduced scale: rounding, not content
        for a, b in zip(xs, xc):
            assert _mean_abs(a, b) < 4.0  # every sample: its crop and its flip
            flips_tell += _mean_abs(a.flip(-1), b) > 8.0
    assert flips_tell >= 10  # a wrong flip would show on these samples (half of them are flipped)


def test_split_resumes_mid_epoch_with_identical_batches(shards):
    whole = _epoch(_stream(shards, "mae", CPU))
    first = _stream(shards, "mae", CPU)
    head = _epoch(first, limit=3)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint holds it
    first.close()
    again = _stream(shards, "mae", CPU)
    again.load_state_dict(state)
    resumed = head + _epoch(again)
    assert [y.tolist() for _, y in resumed] == [y.tolist() for _, y in whole]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, whole))


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_photo(i)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_undecodable_body_counted_and_filled_the_same_way_every_time(tmp_path):
    """A JPEG whose header parses but whose body is cut short passes the workers and fails every decoder in
    the main process: counted `undecodable`, its place filled from the batch (the writer refuses such files,
    so this shard is written by hand)."""
    good = _jpeg(0)
    broken = good[:good.index(b"\xff\xda") + 20]  # header and scan header, no scan data
    with open(tmp_path / "train-000000.tar", "wb") as f:
        w = TarWriter(f, encoder=False)
        for i in range(12):
            w.write({"__key__": f"s{i:05d}", "jpg": broken if i == 7 else _jpeg(i), "cls": str(i).encode()})
        w.close()
    (tmp_path / "train.json").write_text(json.dumps({"shards": ["train-000000.tar"], "counts": [12],
                                                     "classes": [str(i) for i in range(12)]}))
    runs = []
    for _ in range(2):
        s = _stream(str(tmp_path / "train.json"), "mae", CPU, max_bad_fraction=0.5)
        runs.append((_epoch(s), s.bad_counts()))
    (batches, bad), (again, _) = runs
    assert bad == {"undecodable": 1}
    ys = [y.tolist() for _, y in batches]
    assert sorted(v for y in ys for v in y) == list(range(12))  # its place is kept (label 7), its pixels filled
    b, p = next((b, y.index(7)) for b, y in enumerate(ys) if 7 in y)
    x = batches[b][0]
    assert any(torch.equal(x[p], x[q]) for q in range(len(x)) if q != p)  # a copy of another sample of its batch
    assert all(torch.equal(a, c) for (a, _), (c, _) in zip(batches, again))


@pytest.mark.parametrize("key,value", [("auto_augment", "rand-m9-mstd0.5-inc1"), ("color_jitter", 0.4),
                                       ("reprob", 0.25)])
def test_gpu_decode_refuses_augmentations_without_a_device_form(key, value):
    with pytest.raises(UserError, match=rf"data.decode: got 'gpu', but data.{key}=.* has no device form.*"
                                        rf"or decode on the CPU \(data.decode=cpu\)"):
        load_config(None, ["data.decode=gpu", f"data.{key}={value}"])
    assert load_config(None, ["data.decode=cpu", f"data.{key}={value}"]).data.decode == "cpu"


def test_decode_rule_is_provisional_and_keyed_on_device_augmentations_and_cores():
    from pretrain.data.device_decode import CPU_DECODE_CORES_PER_GPU, decode_rule

    plain, deit = load_config(None).data, load_config(None, ["data.auto_augment=rand-m9-mstd0.5-inc1"]).data
    cuda = torch.device("cuda", 0)  # only its type is read: no GPU needed
    assert decode_rule(plain, CPU, 2) == "cpu"
    assert decode_rule(plain, cuda, CPU_DECODE_CORES_PER_GPU - 1) == "gpu"
    assert decode_rule(plain, cuda, CPU_DECODE_CORES_PER_GPU) == "cpu"
    assert decode_rule(deit, cuda, 1) == "cpu"
    assert "PROVISIONAL" in decode_rule.__doc__


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from pretrain.data.writer import write_shards

    out = tmp_path_factory.mktemp("synthetic")
    write_shards("synthetic:40", str(out), samples_per_shard=20)
    return out


def _train(shards, out, *extra):
    return run_cli("train", TINY_MAE, f"data.train_urls={shards}/train.json", f"run.out_dir={out}",
                   "run.device=cpu", "optim.max_steps=2", "checkpoint.every_steps=0", *extra,
                   env={"OMP_NUM_THREADS": "1"})


def test_gpu_decode_on_a_cpu_run_exits_2_with_what_to_do(synthetic, tmp_path):
    r = _train(synthetic, tmp_path, "data.decode=gpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "config key data.decode: got 'gpu', but this run trains on the CPU (cpu): decode on the CPU " \
           "(data.decode=cpu or auto), or train on a CUDA device" in r.stderr


def test_auto_resolves_to_cpu_on_the_cpu_and_is_written_in_the_runs_config(synthetic, tmp_path):
    r = _train(synthetic, tmp_path, "data.decode=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "mae_tiny_cpu"
    assert load_config(str(run / "config.yaml")).data.decode == "cpu"
    assert json.loads((run / "derived.json").read_text())["decode"] == "cpu"
    assert "data.decode=auto: cpu, by the provisional rule" in r.stderr
    again = _train(synthetic, tmp_path, "data.decode=auto", "optim.max_steps=3", "checkpoint.resume=auto")
    assert again.returncode == 0 and "data.decode=auto: cpu, as this run resolved it before" in again.stderr, \
        again.stderr[-3000:]
    assert sorted(metrics_rows(run)) == [1, 2, 3]
