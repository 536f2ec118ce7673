"""`vit-pretrain shards` through the real CLI: image folder, CSV, JSONL, digits, synthetic:N."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pretrain.data import read_index
from pretrain.data.writer import write_shards


def _jpeg(path, side=40, seed=0):
    arr = np.random.default_rng(seed).integers(0, 255, (side, side + 10, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG", quality=90)


def _members(tar_path):
    with tarfile.open(tar_path) as t:
        return t.getnames()


def test_folder_with_a_corrupt_file(cli, tmp_path):
    src = tmp_path / "photos"
    for c, n in (("cat", 5), ("dog", 4)):
        (src / c).mkdir(parents=True)
        for i in range(n):
            _jpeg(src / c / f"{i}.jpg", side=60 if i else 200, seed=i)
    (src / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "dog" / "notes.txt").write_text("ignored: not an image")
    out = tmp_path / "out"
    r = cli("shards", str(src), "--out", str(out), "--samples-per-shard", "4", "--val-fraction", "0.2",
            "--max-side", "64", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "broken.jpg" in r.stderr  # reported by name, and skipped
    train, val = json.loads((out / "train.json").read_text()), json.loads((out / "val.json").read_text())
    assert train["classes"] == ["cat", "dog"]
    assert train["num_samples"] + val["num_samples"] == 9 and val["num_samples"] >= 1
    assert max(train["counts"]) <= 4 and len(train["shards"]) == len(train["counts"])
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"] == train["counts"]
    # the 200 px image was re-encoded to at most 64 px
    for shard in train["shards"] + val["shards"]:
        with tarfile.open(out / shard) as t:
            for m in t.getmembers():
                if m.name.endswith(".jpg"):
                    assert max(Image.open(io.BytesIO(t.extractfile(m).read())).size) <= 64
    assert sum(read_index(str(out / "train.json")).counts) == train["num_samples"]


def test_csv_and_jsonl_lists(cli, tmp_path):
    for i in range(6):
        _jpeg(tmp_path / f"im{i}.jpg", seed=i)
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"im{i}.jpg,{'ab'[i % 2]}\n" for i in range(6))
                                       + "missing.jpg,a\n")
    r = cli("shards", str(tmp_path / "list.csv"), "--out", str(tmp_path / "csv"))
    assert r.returncode == 0, r.stderr
    assert "missing.jpg" in r.stderr
    meta = json.loads((tmp_path / "csv" / "train.json").read_text())
    assert meta["num_samples"] == 6 and meta["classes"] == ["a", "b"]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"path": f"im{i}.jpg", "label": i % 3}) + "\n"
                                                 for i in range(6)))
    res = write_shards(str(tmp_path / "list.jsonl"), str(tmp_path / "jsonl"), samples_per_shard=4)
    assert res["splits"]["train"]["counts"] == [4, 2] and res["classes"] == ["0", "1", "2"]


@pytest.mark.slow
def test_digits_and_synthetic(cli, tmp_path):
    r = cli("shards", "digits", "--out", str(tmp_path / "digits"), "--samples-per-shard", "1000",
            "--val-fraction", "0.1")
    assert r.returncode == 0, r.stderr
    train = json.loads((tmp_path / "digits" / "train.json").read_text())
    val = json.loads((tmp_path / "digits" / "val.json").read_text())
    assert train["num_samples"] + val["num_samples"] == 1797 and len(train["classes"]) == 10
    with tarfile.open(tmp_path / "digits" / train["shards"][0]) as t:
        names = t.getnames()
        img = Image.open(io.BytesIO(t.extractfile(names[1] if names[1].endswith(".png") else names[0]).read()))
    assert img.size == (8, 8) and img.mode == "L" and np.asarray(img).max() > 200  # 0..16 scaled to 0..255
    r = cli("shards", "synthetic:50", "--out", str(tmp_path / "syn"), "--samples-per-shard", "20")
    assert r.returncode == 0, r.stderr
    syn = json.loads((tmp_path / "syn" / "train.json").read_text())
    assert syn["counts"] == [20, 20, 10] and len(syn["classes"]) == 10
    r = cli("shards", "synthetic:x", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "synthetic:N" in r.stderr and "Traceback" not in r.stderr


def test_timm_reads_our_shards(tmp_path):
    import pretrain._compat  # noqa: F401
    from timm.data import create_dataset

    write_shards("synthetic:30", str(tmp_path), samples_per_shard=10)
    ds = create_dataset("wds/syn", root=str(tmp_path), split="train", is_training=False, batch_size=1)
    assert len(ds) == 30
    img, target = next(iter(ds))
    assert img.size == (32, 32) and 0 <= target < 10


def test_parquet_in_the_hugging_face_layout(cli, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = []
    for i in range(7):
        _jpeg(tmp_path / "x.jpg", seed=i)
        imgs.append((tmp_path / "x.jpg").read_bytes())
    imgs[4] = b"not an image"
    table = pa.table({"image": [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(imgs)],
                      "label": [i % 2 for i in range(7)]})
    hf = {"info": {"features": {"image": {"_type": "Image"},
                                "label": {"_type": "ClassLabel", "names": ["cat", "dog"]}}}}
    table = table.replace_schema_metadata({"huggingface": json.dumps(hf)})
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet", row_group_size=3)  # 3 row groups
    r = cli("shards", str(tmp_path / "*.parquet"), "--out", str(tmp_path / "out"), "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "not a readable image" in r.stderr  # row 4, reported and skipped
    meta = json.loads((tmp_path / "out" / "train.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["num_samples"] == 6 and meta["made_by"]["skipped"] == 1
    got = {}
    with tarfile.open(tmp_path / "out" / meta["shards"][0]) as t:
        for m in t.getmembers():
            got.setdefault(m.name.split(".")[0], {})[m.name.split(".", 1)[1]] = t.extractfile(m).read()
    pairs = sorted((s["jpg"], int(s["cls"])) for s in got.values())
    assert pairs == sorted((b, i % 2) for i, b in enumerate(imgs) if i != 4)  # stored byte for byte


def test_resume_after_kill_equals_a_clean_write(tmp_path):
    """kill -9 in the middle of a write, rerun: finished shards are kept, the rest written; every tar equals
    one written in a single run. Also: progress lines on stderr, and a rerun with other options refused."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, run_cli

    args = ["shards", "synthetic:3000", "--samples-per-shard", "150", "--progress-seconds", "0.2"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", *args, "--out", str(out)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("train-*.tar"))) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = sorted(p.name for p in out.glob("train-*.tar"))
    assert 4 <= len(first) < 20 and not (out / "train.json").exists(), first
    assert "img/s, ETA" in proc.stderr.read()  # progress lines, not only at the end
    r = run_cli(*args[:-2], "--seed", "1", "--out", str(out))
    assert r.returncode == 2 and "--seed=0" in r.stderr, r.stderr
    r = run_cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"{len(first)} finished shards kept" in r.stderr
    r = run_cli(*args, "--out", str(tmp_path / "clean"))
    assert r.returncode == 0, r.stderr
    a, b = (json.loads((tmp_path / d / "train.json").read_text()) for d in ("killed", "clean"))
    assert a["shards"] == b["shards"] and a["counts"] == b["counts"] == [150] * 20
    for name in b["shards"]:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert not list(out.glob("*.partial")) and not (out / "_writing.json").exists()
