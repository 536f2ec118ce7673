"""The quickstart through the real CLI, in its reduced form (a few steps per stage: plumbing, not accuracy)."""
import json

import pytest


@pytest.mark.slow
def test_quickstart_small(tmp_path, cli):
    out = tmp_path / "qs"
    p = cli("quickstart", "--small", "--out", str(out), "--workers", "0", timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    for model in ("MAE pretrain", "MAE -> fine-tune", "MAE -> linear probe", "from scratch"):
        assert model in p.stdout
    assert "held-out top-1" in p.stdout and "MAE fine-tune vs from scratch" in p.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["n_val"] == 359 and result["n_train"] == 1438  # the fixed 20% held-out split of 1,797
    rows = {r["model"]: r for r in result["rows"]}
    assert len(rows) == 4
    for r in rows.values():
        assert 0.0 <= r["top1"] <= 1.0 and r["train_s"] > 0 and r["epochs"] == "6 steps"
    for label in ("MAE -> fine-tune", "MAE -> linear probe", "from scratch (same budget as fine-tune)"):
        assert rows[label]["n"] == 359
    for stage in ("mae", "finetune", "linprobe", "scratch"):
        meta = json.loads((out / "export" / f"{stage}.json").read_text())
        assert meta["img_size"] == 32 and meta["patch_size"] == 4 and meta["timm_kwargs"]["embed_dim"] == 128
        assert meta["num_classes"] == (0 if stage == "mae" else 10)
    assert (out / "results.md").read_text().startswith("held-out: 359")
