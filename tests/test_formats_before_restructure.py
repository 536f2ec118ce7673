"""What the code before the package restructure wrote still resumes and loads (tests/fixtures/before_restructure,
made by its make.py at commit a80efb4): a run's step-4 checkpoint resumes to the same step-6 losses and
weights as that code's uninterrupted run, and its export gives the same logits in plain timm."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, metrics_rows

FIXTURE = REPO / "tests/fixtures/before_restructure"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def test_checkpoint_resumes_to_the_same_losses_and_weights(tmp_path):
    from pretrain.config import load_config
    from pretrain.data.writer import write_shards
    from pretrain.engine.consolidate import consolidate
    from pretrain.engine.trainer import train

    write_shards("synthetic:64", str(tmp_path / "shards"), samples_per_shard=16, val_fraction=0.0)
    shutil.copytree(FIXTURE / "run", tmp_path / "run")
    cfg = load_config(str(REPO / "configs/pretrain/supervised_tiny_cpu.yaml"),
                      [*EXPECTED["overrides"], f"data.train_urls={tmp_path}/shards/train.json",
                       f"run.out_dir={tmp_path}"])
    result = train(cfg)
    assert result["step"] == 6
    rows = metrics_rows(tmp_path / "run")
    for step in (5, 6):
        assert rows[step]["loss"] == pytest.approx(EXPECTED["losses"][str(step)], rel=1e-6, abs=0)
    got, _ = consolidate(str(tmp_path / "run"), "step_00000006")
    want = load_file(str(FIXTURE / "step6_module.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


def test_export_loads_and_gives_the_same_logits():
    from pretrain.weights import build_timm, fixed_input, load_exported

    state, meta = load_exported(str(FIXTURE / "export/run.safetensors"))
    with torch.no_grad():
        logits = build_timm(meta, state)(fixed_input(meta))
    torch.testing.assert_close(logits, torch.tensor(EXPECTED["logits"]), rtol=1e-5, atol=1e-6)
