"""The quickstart through the real CLI, in its reduced form (a few steps per stage: plumbing, not accuracy),
its report.png read back panel by panel, and its several-seed summary."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import metrics_rows, run_cli
from pretrain.viz.report import layout, LINE, ticks
from pretrain.errors import UserError
from pretrain.data.index import read_index
from pretrain.data.writer import write_shards
from pretrain.quickstart import LABELS, STAGES, labelled_subset, quickstart, table

STAGE_NAMES = ("mae", "finetune", "linprobe", "scratch")
RUN_NAMES = (*STAGE_NAMES, "finetune_all", "scratch_all")  # the last two: every label, beside the labelled subset


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One `quickstart --small` run shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    p = run_cli("quickstart", "--small", "--out", str(out), "--workers", "0", timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p.stdout


@pytest.mark.slow
def test_quickstart_small(small_run):
    out, stdout = small_run
    for model in ("MAE pretrain", "MAE -> fine-tune", "MAE -> linear probe", "from scratch"):
        assert model in stdout
    assert "held-out top-1" in stdout and "MAE fine-tune vs from scratch" in stdout
    assert f"report: {out}/report.png" in stdout
    result = json.loads((out / "results.json").read_text())
    assert result["n_val"] == 359 and result["n_train"] == 1438  # the fixed 20% held-out split of 1,797
    assert result["seeds"] == 1 and [s["seed"] for s in result["per_seed"]] == [0]
    assert result["labels"] == LABELS
    rows = {r["run"]: r for r in result["rows"]}
    assert tuple(rows) == RUN_NAMES
    for r in rows.values():
        assert 0.0 <= r["top1"] <= 1.0 and r["train_s"] > 0 and r["epochs"] == "6 steps" and r["top1_std"] is None
    assert rows["finetune"]["top1"] == result["per_seed"][0]["rows"][1]["top1"]  # one seed: its own value
    assert result["fine_tune_gain"] == rows["finetune"]["top1"] - rows["scratch"]["top1"]
    assert f"MAE -> fine-tune, {LABELS} labels" in stdout and "MAE -> fine-tune, all labels" in stdout
    for name in RUN_NAMES[1:]:
        assert rows[name]["n"] == 359
    for name in RUN_NAMES:
        meta = json.loads((out / "export" / f"{name}.json").read_text())
        assert meta["img_size"] == 16 and meta["patch_size"] == 4 and meta["timm_kwargs"]["embed_dim"] == 128
        assert meta["num_classes"] == (0 if name == "mae" else 10)
        assert sorted(metrics_rows(out / "runs" / name)) == list(range(1, 7))  # --small logs every step
        # MAE and the all-label runs see every training digit; fine-tune, probe and baseline the labelled ones
        derived = json.loads((out / "runs" / name / "derived.json").read_text())
        assert derived["samples_per_epoch"] == (1438 if name in ("mae", "finetune_all", "scratch_all") else LABELS)
    assert (out / "results.md").read_text().startswith(f"held-out: 359 digits never seen in training "
                                                       f"(train: 1438, {LABELS} of them labelled)")


def _panels(png) -> dict[str, np.ndarray]:
    """Each panel of report.png as int pixels, after checking the picture's size against layout()."""
    width, height, boxes = layout(list(STAGES))
    img = Image.open(png)
    assert img.format == "PNG" and img.size == (width, height) and img.mode == "RGB"
    return {k: np.asarray(img.crop(b), dtype=np.int32) for k, b in boxes.items()}


@pytest.mark.slow
def test_report_png(small_run):
    out, _ = small_run
    panels = _panels(out / "report.png")
    assert set(STAGES) == set(STAGE_NAMES)
    for key, px in panels.items():
        assert px.std() > 5, f"{key} is blank"
    for stage in STAGE_NAMES:  # the curve itself is drawn, not only the axes
        curve = (panels[f"loss/{stage}"] == LINE).all(-1).sum()
        assert curve > 50, (stage, curve)
    n = 10  # one held-out digit per class, 0..9
    assert f"recon/{n - 1}/reconstruction" in panels and f"recon/{n}/original" not in panels
    for i in range(n):
        masked, recon, original = (panels[f"recon/{i}/{r}"] for r in ("masked", "reconstruction", "original"))
        assert np.abs(recon - masked).mean() > 5  # the decoder filled the hidden patches in
        assert np.abs(masked - original).mean() > 5  # and they were hidden
    for row in ("input", "rollout", "mean"):  # two different digits, two different pictures
        assert np.abs(panels[f"attn/0/{row}"] - panels[f"attn/1/{row}"]).mean() > 5
    for i in range(n):  # the maps are laid over the input: each differs from the plain input
        assert np.abs(panels[f"attn/{i}/rollout"] - panels[f"attn/{i}/input"]).mean() > 5


@pytest.mark.slow
def test_quickstart_two_seeds(tmp_path, cli):
    out = tmp_path / "qs"
    p = cli("quickstart", "--small", "--seeds", "2", "--out", str(out), "--workers", "0", timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "held-out top-1 (mean ± std, 2 seeds)" in p.stdout and " points over 2 seeds" in p.stdout
    assert "per seed, MAE fine-tune minus from scratch: seed 0 " in p.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["seeds"] == 2 and [s["seed"] for s in result["per_seed"]] == [0, 1]
    for i, row in enumerate(result["rows"]):
        each = [s["rows"][i]["top1"] for s in result["per_seed"]]
        assert row["top1"] == pytest.approx(np.mean(each)) and row["top1_std"] == pytest.approx(np.std(each, ddof=1))
    for seed in (0, 1):
        for name in RUN_NAMES:
            cfg = yaml.safe_load((out / f"seed{seed}/runs/{name}/config.yaml").read_text())
            assert cfg["run"]["seed"] == seed
            assert (out / f"seed{seed}/export/{name}.safetensors").exists()
    assert not (out / "runs").exists() and (out / "report.png").exists()
    # different seeds, different weights: the fine-tunes' losses and exported files differ
    losses = [metrics_rows(out / f"seed{s}/runs/finetune")[6]["loss"] for s in (0, 1)]
    assert losses[0] != losses[1]
    files = [(out / f"seed{s}/export/finetune.safetensors").read_bytes() for s in (0, 1)]
    assert files[0] != files[1]


def test_labelled_subset(tmp_path):
    """The labelled subset is the first shards of the training split, read through their own index."""
    shards = tmp_path / "shards"
    write_shards("digits", str(shards), samples_per_shard=32, val_fraction=0.2, seed=0)
    url = labelled_subset(str(shards), 64)
    assert url == f"{shards}/train_64labels.json"
    sub, full = read_index(url), read_index(f"{shards}/train.json")
    assert sub.counts == [32, 32] and sub.shards == full.shards[:2] and sub.classes == full.classes
    with pytest.raises(UserError, match="--labels 100: must be a multiple of 32"):
        labelled_subset(str(shards), 100)


def test_seeds_bad_values(tmp_path):
    with pytest.raises(UserError, match="--seeds must be at least 1, got 0"):
        quickstart(str(tmp_path), seeds=0)
    with pytest.raises(UserError, match="drop the run.seed override"):
        quickstart(str(tmp_path), seeds=2, extra=["run.seed=3"])
    with pytest.raises(UserError, match="--labels 100: must be a multiple of 32"):
        quickstart(str(tmp_path), labels=100)
    assert not (tmp_path / "shards").exists()  # refused before any work


def test_table_over_seeds():
    rows = [{"model": "MAE -> fine-tune", "epochs": "40", "top1": 0.97, "top1_std": 0.01, "top5": None,
             "top5_std": None, "train_s": 270.0, "train_s_std": 2.0}]
    per_seed = [{"seed": 0, "fine_tune_gain": 0.02}, {"seed": 1, "fine_tune_gain": 0.04}]
    text = table({"rows": rows, "seeds": 2, "per_seed": per_seed, "fine_tune_gain": 0.03,
                  "fine_tune_gain_std": 0.0141421, "total_s": 600, "n_val": 359, "n_train": 1438})
    assert "| MAE -> fine-tune | 40 | 97.00 ± 1.00% | - | 270 s |" in text
    assert "MAE fine-tune vs from scratch: +3.00 ± 1.41 points over 2 seeds" in text
    assert "seed 0 +2.00, seed 1 +4.00 points" in text


def test_ticks_are_round_and_cover_the_range():
    assert ticks(0, 6) == [0, 2, 4, 6]
    assert ticks(0, 220) == [0, 50, 100, 150, 200, 250]
    assert ticks(0.113, 0.92) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert ticks(2.31, 2.79) == [2.3, 2.4, 2.5, 2.6, 2.7, 2.8]
    assert ticks(1.0, 1.0) == [0.5, 0.75, 1.0, 1.25, 1.5]  # one logged point still gets an axis
