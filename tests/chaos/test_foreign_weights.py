"""Weights and checkpoints vit-pretrain did not write, given to fine-tune, eval, export or resume: exit 2
with one line naming the file, and never unpickling what could run code (a pickle whose __reduce__
would create a marker file). Through the CLI: `train` as a process, `eval` and `export` (which start
no job) in this one."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow
TINY = str(REPO / "configs/pretrain/supervised_tiny_cpu.yaml")
ENV = {"OMP_NUM_THREADS": "1"}


class Evil:
    """Unpickling this runs a shell command (the classic malicious checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Shards and a real 2-step run (ZeRO 2) to copy and tamper with."""
    from pretrain.data.writer import write_shards

    root = tmp_path_factory.mktemp("foreign")
    write_shards("synthetic:80", str(root / "shards"), samples_per_shard=20, val_fraction=0.25)
    r = run_cli("train", TINY, f"data.train_urls={root}/shards/train.json", f"run.out_dir={root}", "run.name=run",
                "optim.max_steps=2", env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def _finetune(root: Path, tmp_path: Path, init_from, *extra):
    return run_cli("train", TINY, f"data.train_urls={root}/shards/train.json", f"run.out_dir={tmp_path}",
                   "run.name=ft", "task.kind=finetune", f"finetune.init_from={init_from}", "optim.max_steps=2",
                   *extra, env=ENV)


def _one_line_exit_2(r, *fragments):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("[")]  # DeepSpeed's log lines
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines and ": error: " in lines[-1], r.stderr[-3000:]
    for f in fragments:
        assert f in lines[-1], lines[-1]
    return lines[-1]


class _Done:
    """What `_one_line_exit_2` reads of a command run in this process through the CLI's entry point."""

    def __init__(self, argv: list[str], capsys):
        from pretrain.cli import main

        capsys.readouterr()
        self.returncode = main(argv)
        self.stderr = capsys.readouterr().err


def _weights(tmp_path: Path, kind: str) -> Path:
    marker = tmp_path / "ran"
    path = tmp_path / f"{kind}.pth"
    if kind == "malicious":
        torch.save({"pos_embed": torch.zeros(1), "x": Evil(marker)}, path)
    elif kind == "state_dict":
        torch.save({"pos_embed": torch.zeros(1, 17, 64), "head.weight": torch.zeros(10, 64)}, path)
    elif kind == "legacy_pickle":
        torch.save({"x": Evil(marker)}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(os.urandom(4096))
    (tmp_path / f"{kind}.json").write_text("{}")  # a meta file next to it: the weights alone are at fault
    return path


def test_weights_that_are_not_safetensors(run, tmp_path, capsys):
    pickled = "is a PyTorch pickle (.pt/.pth), not safetensors"
    cases = {"malicious": pickled, "legacy_pickle": pickled, "state_dict": pickled,
             "random": "not a readable safetensors file"}
    weights = {kind: _weights(tmp_path, kind) for kind in cases}
    lines = [_one_line_exit_2(_finetune(run, tmp_path, weights["malicious"]), str(weights["malicious"]), pickled)]
    for kind, fragment in cases.items():  # eval reads weights as fine-tuning does (load_exported); in-process
        r = _Done(["eval", str(weights[kind]), "--data", f"{run}/shards/val.json"], capsys)
        lines.append(_one_line_exit_2(r, str(weights[kind]), fragment))
    assert not (tmp_path / "ran").exists()  # nothing was unpickled
    print(*lines, sep="\n")  # docs/reliability.md


def _tampered(run: Path, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A copy of the run whose checkpoint's `name` file is a pickle that runs code; -> (run copy, marker)."""
    copy = tmp_path / "copy"
    tmp_path.mkdir(exist_ok=True)
    shutil.copytree(run / "run", copy)
    marker = tmp_path / "ran"
    torch.save({"module": {"x": torch.zeros(1)}, "evil": Evil(marker)}, copy / "checkpoints/step_00000002" / name)
    return copy, marker


def test_checkpoint_that_would_run_code_is_refused(run, tmp_path, capsys):
    refusal = "is not a checkpoint vit-pretrain wrote: its pickle calls posix.system on load"

    def resume(copy):
        return run_cli("train", TINY, f"data.train_urls={run}/shards/train.json", f"run.out_dir={tmp_path}",
                       "run.name=resumed", "optim.max_steps=4", f"checkpoint.resume={copy}/checkpoints/step_00000002",
                       env=ENV)

    copy, marker = _tampered(run, tmp_path / "model", "mp_rank_00_model_states.pt")
    bad = f"{copy}/checkpoints/step_00000002/mp_rank_00_model_states.pt"
    lines = [_one_line_exit_2(_finetune(run, tmp_path, copy), bad, refusal),  # a run folder as init_from
             _one_line_exit_2(_Done(["export", str(copy), "--out", str(tmp_path / "w.safetensors")], capsys),
                              bad, refusal),
             _one_line_exit_2(resume(copy), bad, refusal)]
    assert not marker.exists()  # nothing was unpickled
    # the optimizer shard, which DeepSpeed alone reads
    copy, marker = _tampered(run, tmp_path / "optim", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    lines.append(_one_line_exit_2(resume(copy), f"{copy}/checkpoints/step_00000002/"
                                  "zero_pp_rank_0_mp_rank_00_optim_states.pt", refusal))
    assert not marker.exists()
    print(*lines, sep="\n")  # docs/reliability.md


def test_checkpoint_of_another_model_is_named(run, tmp_path):
    r = run_cli("train", TINY, f"data.train_urls={run}/shards/train.json", f"run.out_dir={tmp_path}",
                "run.name=deeper", "model.depth=3", "optim.max_steps=4",
                f"checkpoint.resume={run}/run/checkpoints/step_00000002", env=ENV)
    line = _one_line_exit_2(r, f"could not load checkpoint {run}/run/checkpoints/step_00000002",
                            "Missing key(s) in state_dict: \"encoder.blocks.2.", "it holds another model")
    # the source checkpoint is untouched and still resumes its own model
    again = run_cli("train", TINY, f"data.train_urls={run}/shards/train.json", f"run.out_dir={tmp_path}",
                    "run.name=same", "optim.max_steps=3", f"checkpoint.resume={run}/run/checkpoints/step_00000002",
                    env=ENV)
    assert again.returncode == 0 and "at step 2" in again.stderr, again.stderr[-3000:]
    print(line)  # docs/reliability.md
