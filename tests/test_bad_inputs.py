"""Malformed configs and command lines: each ends with exit 2 and one line on stderr saying what was wrong
and which value, no traceback (DESIGN.md's public surface). Through the real CLI entry point
(`pretrain.cli.main`, in this process for the config cases: they never start a job; as a process for
the cases that `train` itself finds)."""
from __future__ import annotations

import pytest

from conftest import REPO, run_cli

TINY = str(REPO / "configs/pretrain/supervised_tiny_cpu.yaml")

# (id, files to write {name: bytes}, argv with {tmp} for the folder, a fragment the line must hold)
CASES = [
    ("unknown key", {}, ["config", "optim.lrr=1"], "unknown config key optim.lrr"),
    ("unknown section", {}, ["config", "optimizer.lr=1"], "did you mean optim?"),
    ("misspelt key", {}, ["config", TINY, "model.dpth=3"], "did you mean model.depth?"),
    ("str for int", {}, ["config", "data.batch_size=abc"], "data.batch_size: got 'abc', expected int"),
    ("float for int", {}, ["config", "data.batch_size=8.5"], "data.batch_size: got 8.5, expected int"),
    ("empty value", {}, ["config", "data.batch_size="], "data.batch_size: got ''"),
    ("not a bool", {}, ["config", "logging.tensorboard=maybe"], "logging.tensorboard: got 'maybe', expected bool"),
    ("list of str", {}, ["config", "data.mean=[a,b,c]"], "data.mean: got ['a', 'b', 'c'], expected list of float"),
    ("int for urls", {}, ["config", "data.train_urls=5"], "data.train_urls: got 5"),
    ("negative batch", {}, ["config", "data.batch_size=-8"], "data.batch_size: got -8, must be positive"),
    ("zero lr", {}, ["config", "optim.lr_per_256=0"], "optim.lr_per_256: got 0.0, must be positive"),
    ("negative lr", {}, ["config", "optim.lr_per_256=-1e-3"], "optim.lr_per_256: got -0.001"),
    ("infinite lr", {}, ["config", "optim.lr_per_256=inf"], "optim.lr_per_256: got 'inf', expected a finite number"),
    ("nan lr", {}, ["config", "optim.lr_per_256=.nan"], "optim.lr_per_256: got nan"),
    ("negative epochs", {}, ["config", "optim.epochs=-1"], "optim.epochs: got -1.0"),
    ("negative workers", {}, ["config", "data.workers=-1"], "data.workers: got -1, must be >= 0"),
    ("img not multiple of patch", {}, ["config", "model.img_size=30", "model.patch_size=16"],
     "model.img_size: got 30, must be a multiple of model.patch_size (16)"),
    ("zero img_size", {}, ["config", "model.img_size=0"], "model.img_size: got 0, must be positive"),
    ("heads not dividing width", {}, ["config", "model.num_heads=5"], "model.num_heads: got 5, must divide"),
    ("bad task enum", {}, ["config", "task.kind=simclr"], "task.kind: got 'simclr', expected one of 'supervised'"),
    ("bad precision enum", {}, ["config", "deepspeed.precision=fp8"], "deepspeed.precision: got 'fp8'"),
    ("bad device enum", {}, ["config", "run.device=tpu"], "run.device: got 'tpu'"),
    ("unknown arch", {}, ["config", "model.arch=vit_foo"], "model.arch: unknown architecture 'vit_foo'"),
    ("mask ratio out of range", {}, ["config", "mae.mask_ratio=1.5"], "mae.mask_ratio: got 1.5, must be in (0, 1)"),
    ("zero stage 5", {}, ["config", "deepspeed.zero_stage=5"], "deepspeed.zero_stage: got 5"),
    ("keep 0", {}, ["config", "checkpoint.keep=0"], "checkpoint.keep: got 0, must be >= 1"),
    ("bad fraction", {}, ["config", "data.max_bad_fraction=2"], "data.max_bad_fraction: got 2.0, must be in [0, 1]"),
    ("one beta", {}, ["config", "optim.betas=[0.9]"], "optim.betas: got [0.9], must be two values"),
    ("finetune without weights", {}, ["config", "task.kind=finetune"], "finetune.init_from: got ''"),
    ("section set to a scalar", {}, ["config", "optim=3"], "config key optim: got 3, expected a section"),
    ("key below a value", {}, ["config", "optim.lr_per_256.x=1"], "optim.lr_per_256: got {'x': 1}"),
    ("override without =", {}, ["config", TINY, "optim.max_steps"], "override 'optim.max_steps' is not key=value"),
    ("lone key without =", {}, ["config", "optim.max_steps"],
     "'optim.max_steps' is neither a config file nor a key=value override"),
    ("empty key", {}, ["config", "=3"], "override '=3' has an empty key part"),
    ("empty key part", {}, ["config", "a..b=1"], "override 'a..b=1' has an empty key part"),
    ("missing file", {}, ["config", "{tmp}/absent.yaml"], "config file not found: '{tmp}/absent.yaml'"),
    ("folder as config", {}, ["config", "{tmp}"], "config file '{tmp}' is a folder"),
    ("bad YAML", {"bad.yaml": b"optim: {max_steps: [1, 2\n"}, ["config", "{tmp}/bad.yaml"],
     "{tmp}/bad.yaml: not valid YAML"),
    ("YAML list", {"list.yaml": b"- a\n- b\n"}, ["config", "{tmp}/list.yaml"], "top level must be a mapping"),
    ("binary file", {"bin.yaml": b"\xff\xfe\x00junk"}, ["config", "{tmp}/bin.yaml"], "is not UTF-8 text"),
    ("base cycle", {"c1.yaml": b"_base_: c2.yaml\n", "c2.yaml": b"_base_: c1.yaml\n"}, ["config", "{tmp}/c1.yaml"],
     "_base_ cycle: {tmp}/c1.yaml -> {tmp}/c2.yaml -> {tmp}/c1.yaml"),
    ("missing base", {"b.yaml": b"_base_: gone.yaml\n"}, ["config", "{tmp}/b.yaml"],
     "config file not found: '{tmp}/gone.yaml'"),
    ("wrong type in a file", {"t.yaml": b"model: {qkv_bias: 'yes'}\n"}, ["config", "{tmp}/t.yaml"],
     "model.qkv_bias: got 'yes', expected bool"),
    ("unknown option", {}, ["train", "--bogus"], "unrecognized arguments: --bogus; see `vit-pretrain train --help`"),
    ("unknown config option", {}, ["config", "--nope"], "unrecognized arguments: --nope"),
    ("unknown subcommand", {}, ["trian"], "invalid choice: 'trian'"),
    ("export of a non-run folder", {}, ["export", "{tmp}"], "{tmp} has no checkpoints/latest"),
    ("shards from nowhere", {}, ["shards", "{tmp}/nowhere", "--out", "{tmp}/out"], "source '{tmp}/nowhere' is not"),
]


@pytest.mark.parametrize("files,argv,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(files, argv, fragment, tmp_path, capsys):
    from pretrain.cli import main

    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    try:
        code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    except SystemExit as e:  # argparse's own exit
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("vit-pretrain") and ": error: " in lines[0], err
    assert fragment.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]


@pytest.mark.parametrize("overrides,fragment", [
    ([], "no shard URLs given (data.train_urls is empty)"),
    (["data.train_urls={tmp}/train-{{000..009}}.tar"], "shard pattern matched no files: '{tmp}/train-{{000..009}}.tar'"),
    (["data.train_urls={shards}/train.json", "data.val_urls={tmp}/val.json"],
     "config key data.val_urls: shard index not found: '{tmp}/val.json'"),
], ids=["no train urls", "no shard matched", "val index missing"])
def test_bad_data_urls_stop_train_before_any_step(overrides, fragment, tmp_path):
    """Found by `train` itself, before the first step (a wrong val_urls used to surface at the first evaluation)."""
    from pretrain.data.writer import write_shards

    shards = tmp_path / "shards"
    write_shards("synthetic:40", str(shards), samples_per_shard=20)
    fill = {"tmp": tmp_path, "shards": shards}
    r = run_cli("train", TINY, f"run.out_dir={tmp_path}", *(o.format(**fill) for o in overrides),
                env={"OMP_NUM_THREADS": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith("vit-pretrain train: error: ") and fragment.format(**fill) in lines[-1], lines[-1]
    assert not (tmp_path / "supervised_tiny_cpu/metrics.jsonl").exists()
