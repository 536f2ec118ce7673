"""`bench feed` end to end on the CPU (its dry run: a micro model, tiny shards); speed itself is never asserted."""
import json
import os

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run: no gpu decode rows")
def test_bench_feed_dry_run_rows(cli, tmp_path):
    """Both recipes, full-size and pre-resized shards written by the real writer, each fed row against the same
    recipe's synthetic steps: rates positive, ratio = fed / synthetic, data wait, workers, cores and decode
    recorded; decode=gpu is skipped with its reason on the CPU, and no goal is judged off a GPU."""
    out = tmp_path / "feed.json"
    r = cli("bench", "feed", "--feed-dry-run", "--feed-dir", str(tmp_path / "cache"), "--feed-workers", "1",
            "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(row["recipe"], row["shards"]) for row in rows] == [
        ("deit", "full"), ("deit", "resized"), ("mae", "full"), ("mae", "resized")]
    for row in rows:
        assert row["ours"] > 0 and row["baseline"] > 0 and row["unit"].startswith("img/s")
        assert row["ratio"] == pytest.approx(row["ours"] / row["baseline"])
        assert row["data_wait_s_per_step"] > 0 and 0 < row["data_wait_fraction"] < 1
        assert row["decode"] == "cpu" and row["workers"] == 1 and row["buffer_batches"] == 3
        assert row["cores"] > 0 and row["cpu_s"] > 0 and row["device"] == "cpu" and row["met"] is None
        assert row["warmup_steps"] >= 1 and isinstance(row["drained"], bool)
    synthetic = {row["recipe"]: row["baseline"] for row in rows}
    assert all(row["baseline"] == synthetic[row["recipe"]] for row in rows)  # one synthetic window per recipe
    full, resized = rows[0], rows[1]
    assert full["image"] == "80x60" and resized["image"] == "max side 40"
    assert resized["shard_bytes_per_image"] < full["shard_bytes_per_image"]
    assert "deit full decode=gpu skipped: data.decode=gpu needs CUDA" in r.stderr
    assert "feed mae resized decode=cpu workers=1" in r.stdout  # the printed table


def test_make_photos_repeats_distinct_ones_as_links(monkeypatch, tmp_path):
    """Past DISTINCT images the folder holds hard links, and a second call keeps what is there."""
    from pretrain.bench import feed

    monkeypatch.setattr(feed, "DISTINCT", 4)
    root = feed.make_photos(str(tmp_path / "photos"), 12, (40, 30), workers=1)
    files = sorted(f"{d}/{f}" for d in os.listdir(root) for f in os.listdir(f"{root}/{d}"))
    assert len(files) == 12 and len(os.listdir(root)) == feed.CLASSES
    ino = {int(f.rsplit("/", 1)[1][:-4]): os.stat(f"{root}/{f}").st_ino for f in files}
    assert all(ino[i] == ino[i % 4] for i in range(12)) and len(set(ino.values())) == 4
    before = {f: os.stat(f"{root}/{f}").st_mtime_ns for f in files}
    feed.make_photos(root, 12, (40, 30), workers=1)
    assert {f: os.stat(f"{root}/{f}").st_mtime_ns for f in files} == before


def test_bench_feed_refuses_bad_flags():
    """Unknown recipes or decode modes and non-positive counts end in one line naming the flag."""
    import argparse

    from pretrain.bench import feed
    from pretrain.errors import UserError

    with pytest.raises(UserError, match="^--feed-recipes: unknown value 'vit'; choose from deit,mae$"):
        feed.choices("deit,vit", feed.RECIPES, "--feed-recipes")
    with pytest.raises(UserError, match="^--feed-decode: give at least one of cpu,gpu$"):
        feed.choices(" ,", feed.DECODES, "--feed-decode")
    parser = argparse.ArgumentParser()
    feed.add_arguments(parser)
    for flags, message in [(["--feed-steps", "0"], "--feed-steps 0: must be >= 1"),
                           (["--feed-workers", "4,0"], "--feed-workers '4,0': each count must be >= 1"),
                           (["--feed-workers", "four"], "--feed-workers 'four': give worker counts")]:
        args = parser.parse_args(flags)
        args.quick = False
        with pytest.raises(UserError, match=message):
            feed.plan_of(args)
    args = parser.parse_args([])
    args.quick = False
    assert feed.plan_of(args)["workers"] == [max(1, len(os.sched_getaffinity(0)) - 2)]
    args = parser.parse_args(["--feed-workers", "14,4"])
    args.quick = False
    assert feed.plan_of(args)["workers"] == [14, 4]


def test_halving_retries_at_half_the_batch_until_it_fits(capsys):
    """The out-of-memory retry `bench gpu` and `bench feed` share: halve, say so, give up at batch 1."""
    from pretrain.bench.gpu import halving

    tried = []

    def measure_at(batch):
        tried.append(batch)
        if batch > 64:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"img_s": 1.0}

    assert halving(measure_at, 256, "feed: mae synthetic") == ({"img_s": 1.0}, 64) and tried == [256, 128, 64]
    assert "bench feed: mae synthetic ran out of memory at batch 256; retrying at 128" in capsys.readouterr().err
    with pytest.raises(torch.OutOfMemoryError):
        halving(lambda b: measure_at(1000), 2, "x")
