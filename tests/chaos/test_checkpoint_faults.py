"""Checkpoints cannot mix runs: a stale tag folder or universal conversion is never reused, and a
checkpoint that fails to load is named and, with checkpoint.resume=auto, skipped for the previous one.
Real 1-process runs through the CLI on real shards."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, metrics_rows, run_cli

pytestmark = pytest.mark.slow
CONFIG = REPO / "configs/pretrain/supervised_tiny_cpu.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pretrain.data.writer import write_shards

    out = tmp_path_factory.mktemp("ckpt-shards")
    write_shards("synthetic:120", str(out), samples_per_shard=32, val_fraction=0.2)
    return out


def _train(shards, out, *overrides):
    proc = run_cli("train", str(CONFIG), f"data.train_urls={shards}/train.json", f"run.out_dir={out}",
                   "run.name=run", "checkpoint.every_steps=2", "checkpoint.keep=3", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_stale_tag_folder_is_replaced_not_mixed(shards, tmp_path):
    _train(shards, tmp_path, "optim.max_steps=4")
    ck = tmp_path / "run/checkpoints"
    old_uid = json.loads((ck / "step_00000004/meta.json").read_text())["uid"]
    stale = ck / "step_00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt"  # a shard of a 2-rank run
    stale.write_bytes(b"not ours")
    # roll back to step 2 and train on: step 4 is written again into the same tag
    _train(shards, tmp_path, "optim.max_steps=4", f"checkpoint.resume={ck}/step_00000002")
    assert not stale.exists()
    assert json.loads((ck / "step_00000004/meta.json").read_text())["uid"] != old_uid
    assert (ck / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in ck.iterdir() if ".tmp-" in p.name or ".old-" in p.name) == []


def test_stale_universal_conversion_is_redone(shards, tmp_path):
    from pretrain.engine import checkpoint as ckpt

    ck = tmp_path / "run/checkpoints"
    _train(shards, tmp_path, "optim.max_steps=2")
    ckpt.to_universal(str(ck), "step_00000002", rank=0)
    first = (ck / "step_00000002_universal/done").read_text()
    # the same tag written again by another run (another seed: other weights), in the same folder
    _train(shards, tmp_path, "optim.max_steps=2", "checkpoint.resume=never", "run.seed=5")
    uid = json.loads((ck / "step_00000002/meta.json").read_text())["uid"]
    assert first.strip() != uid
    ckpt.to_universal(str(ck), "step_00000002", rank=0)
    assert (ck / "step_00000002_universal/done").read_text().strip() == uid
    module = torch.load(ck / "step_00000002/mp_rank_00_model_states.pt", weights_only=False)["module"]
    name = "head.weight" if "head.weight" in module else sorted(module)[0]
    universal = next((ck / "step_00000002_universal/zero").glob(f"*{name}/fp32.pt"))
    assert torch.equal(torch.load(universal, weights_only=False)["param"].float(), module[name].float())


def test_unloadable_latest_falls_back_to_the_previous_checkpoint(shards, tmp_path):
    _train(shards, tmp_path, "optim.max_steps=4")
    ck = tmp_path / "run/checkpoints"
    states = ck / "step_00000004/mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])  # a truncated write
    proc = _train(shards, tmp_path, "optim.max_steps=6")
    assert f"could not load checkpoint {ck}/step_00000004: {states} is unreadable" in proc.stderr
    assert f"falling back to {ck}/step_00000002" in proc.stderr
    assert f"resumed from {ck}/step_00000002 at step 2" in proc.stderr
    assert max(metrics_rows(tmp_path / "run")) == 6
    # an explicit path does not fall back: it names the file and stops (exit 2, one line)
    explicit = run_cli("train", str(CONFIG), f"data.train_urls={shards}/train.json", f"run.out_dir={tmp_path}",
                       "run.name=other", f"checkpoint.resume={ck}/step_00000006", "optim.max_steps=8")
    assert explicit.returncode == 0, explicit.stderr[-3000:]
    (ck / "step_00000006/mp_rank_00_model_states.pt").write_bytes(b"")
    bad = run_cli("train", str(CONFIG), f"data.train_urls={shards}/train.json", f"run.out_dir={tmp_path}",
                  "run.name=third", f"checkpoint.resume={ck}/step_00000006", "optim.max_steps=8")
    assert bad.returncode == 2 and "step_00000006/mp_rank_00_model_states.pt is unreadable" in bad.stderr
    assert "Traceback" not in bad.stderr
