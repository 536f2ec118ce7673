"""The trainer evaluates with evaluation/evaluate.py's loop: unlabelled validation samples (label -1, as an
index without class names gives for a sample without `.cls`) are left out, so they change no metric."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from conftest import REPO

TINY = str(REPO / "configs/pretrain/supervised_tiny_cpu.yaml")


def _with_unlabelled(val_index: Path, out: Path) -> tuple[Path, int]:
    """The val shards again, each sample followed by an unlabelled copy (its image, no `.cls`), indexed
    without class names (so the copies decode with label -1, not as bad samples); -> (index, labelled n)."""
    meta = json.loads(val_index.read_text())
    shards, counts, labelled = [], [], 0
    for i, name in enumerate(meta["shards"]):
        dst = out / f"mixed-{i:06d}.tar"
        with tarfile.open(val_index.parent / name) as src, tarfile.open(dst, "w") as tar:
            n = 0
            for m in src.getmembers():
                data = src.extractfile(m).read()
                tar.addfile(m, io.BytesIO(data))
                key, ext = m.name.split(".", 1)
                if ext != "cls":
                    copy = tarfile.TarInfo(f"{key}_nolabel.{ext}")
                    copy.size = len(data)
                    tar.addfile(copy, io.BytesIO(data))
                    n += 2
                else:
                    labelled += 1
        shards.append(dst.name)
        counts.append(n)
    index = out / "mixed.json"
    index.write_text(json.dumps({"shards": shards, "counts": counts}))
    return index, labelled


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pretrain.data.writer import write_shards

    out = tmp_path_factory.mktemp("val-shards")
    write_shards("synthetic:96", str(out), samples_per_shard=16, val_fraction=1 / 3)
    return out


def test_unlabelled_val_samples_change_no_metric(shards, tmp_path):
    from pretrain.config import load_config
    from pretrain.engine.trainer import train

    mixed, labelled = _with_unlabelled(shards / "val.json", tmp_path)
    results = {}
    for name, val in (("labelled", shards / "val.json"), ("mixed", mixed)):
        cfg = load_config(TINY, [f"data.train_urls={shards}/train.json", f"data.val_urls={val}",
                                 f"run.out_dir={tmp_path}", f"run.name={name}", "optim.max_steps=3",
                                 "checkpoint.every_steps=0", "eval.every_steps=2", "data.workers=0"])
        results[name] = train(cfg)
    a, b = results["labelled"], results["mixed"]
    assert a["val_n"] == b["val_n"] == labelled > 0
    for k in ("val_top1", "val_top5", "val_loss"):
        assert b[k] == pytest.approx(a[k], rel=1e-6), k
    # the periodic evaluation (step 2) too, as logged
    rows = {}
    for name in results:
        logged = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        rows[name] = [r for r in logged if r.get("step") == 2 and any(k.startswith("val") for k in r)]
    assert rows["labelled"] and len(rows["labelled"]) == len(rows["mixed"])
    for ra, rb in zip(rows["labelled"], rows["mixed"]):
        assert {k: pytest.approx(v, rel=1e-6) for k, v in ra.items() if k != "time"} == \
            {k: v for k, v in rb.items() if k != "time"}
