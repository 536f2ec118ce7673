import dataclasses
import subprocess
import sys

import pytest
import yaml

from pretrain.config import (Config, field_docs, load_config, render_default_yaml, render_reference_md, to_dict)
from pretrain.errors import UserError
from pretrain.models.archs import check_model_config
from tests.conftest import REPO


def write(path, text):
    path.write_text(text)
    return str(path)


def test_default_yaml_is_the_dataclass_defaults():
    assert (REPO / "configs" / "default.yaml").read_text() == render_default_yaml()
    assert load_config(str(REPO / "configs" / "default.yaml")) == Config()


def test_every_field_documented_and_reference_current():
    docs = field_docs()
    assert len(docs) > 60
    undocumented = [k for k, v in docs.items() if not v]
    assert not undocumented, f"fields without a docstring: {undocumented}"
    assert (REPO / "docs" / "config.md").read_text() == render_reference_md()


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", "model: {arch: vit_small_patch16_224, depth: 6}\noptim: {lr_per_256: 1.0e-3}\n")
    write(tmp_path / "mid.yaml", "_base_: base.yaml\nmodel: {depth: 8}\ndata: {batch_size: 32}\n")
    exp = write(tmp_path / "sub" / "exp.yaml", "_base_: ../mid.yaml\noptim: {betas: [0.9, 0.95]}\n")
    cfg = load_config(exp, ["data.batch_size=16", "model.global_pool=avg", "deepspeed.offload_optimizer=true",
                            "data.train_urls=shards/train-{000000..000009}.tar", "data.crop_scale=[0.2, 1.0]"])
    assert cfg.model.arch == "vit_small_patch16_224"
    assert cfg.model.depth == 8                # mid overrides base
    assert cfg.optim.lr_per_256 == 1e-3        # from base, through mid
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.data.batch_size == 16           # CLI beats files
    assert cfg.model.global_pool == "avg"
    assert cfg.deepspeed.offload_optimizer is True
    assert cfg.data.train_urls == "shards/train-{000000..000009}.tar"
    assert cfg.data.crop_scale == [0.2, 1.0]
    assert cfg.model.embed_dim is None         # untouched fields keep defaults


def test_multiple_bases_later_wins(tmp_path):
    write(tmp_path / "a.yaml", "optim: {epochs: 3, weight_decay: 0.1}\n")
    write(tmp_path / "b.yaml", "optim: {epochs: 5}\n")
    exp = write(tmp_path / "exp.yaml", "_base_: [a.yaml, b.yaml]\n")
    cfg = load_config(exp)
    assert (cfg.optim.epochs, cfg.optim.weight_decay) == (5.0, 0.1)


def test_scientific_notation_without_dot_is_a_float():
    assert load_config(None, ["optim.lr_per_256=3e-4"]).optim.lr_per_256 == pytest.approx(3e-4)


def test_shipped_configs_all_resolve():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        cfg = load_config(str(path))
        assert isinstance(cfg, Config), path
        check_model_config(cfg.model, cfg.task.kind)


def test_deepspeed_extra_passes_dicts_whole(tmp_path):
    exp = write(tmp_path / "e.yaml", "deepspeed: {extra: {wall_clock_breakdown: true, zero_optimization: {round_robin_gradients: true}}}\n")
    cfg = load_config(exp)
    assert cfg.deepspeed.extra == {"wall_clock_breakdown": True, "zero_optimization": {"round_robin_gradients": True}}


BAD = [
    (["model.dpth=3"], "model.dpth"),
    (["optim.lr_per_256=abc"], "optim.lr_per_256"),
    (["mae.mask_ratio=1.5"], "mae.mask_ratio"),
    (["mae.mask_ratio=0"], "mae.mask_ratio"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["deepspeed.precision=fp8"], "deepspeed.precision"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.batch_size=2.5"], "data.batch_size"),
    (["data.workers=true"], "data.workers"),
    (["task.kind=dino"], "task.kind"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["data.crop_scale=[0.5, 0.2]"], "data.crop_scale"),
    (["deepspeed.offload_params=true"], "deepspeed.offload_params"),
    (["task.kind=finetune"], "finetune.init_from"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
    (["nosection.x=1"], "nosection"),
    (["model=3"], "model"),
    (["eval.knn_every_steps=10"], "eval.knn_train_urls"),
    (["data.std=[0.2, 0.2, 0]"], "data.std"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[b[0][0] for b in BAD])
def test_malformed_overrides_name_the_key(overrides, key):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert key in str(e.value)
    assert "\n" not in str(e.value)


# the architecture the model section names: checked by models (the CLI's `config` and `train` after loading)
ARCH_BAD = [
    (["model.img_size=225"], "model.img_size"),
    (["model.num_heads=5"], "model.num_heads"),
    (["model.arch=vit_gigantic"], "model.arch"),
    (["model.depth=0"], "model.depth"),
]


@pytest.mark.parametrize("overrides,key", ARCH_BAD, ids=[b[0][0] for b in ARCH_BAD])
def test_unsound_architectures_name_the_key(overrides, key):
    cfg = load_config(None, overrides)
    with pytest.raises(UserError) as e:
        check_model_config(cfg.model, cfg.task.kind)
    assert key in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_files(tmp_path):
    cases = {
        "notyaml.yaml": ("model: [unclosed\n", "not valid YAML"),
        "list.yaml": ("- 1\n- 2\n", "top level must be a mapping"),
        "cycle.yaml": ("_base_: cycle.yaml\n", "_base_ cycle"),
        "missing_base.yaml": ("_base_: nowhere.yaml\n", "nowhere.yaml"),
        "section_scalar.yaml": ("optim: 3\n", "optim"),
        "wrong_type.yaml": ("model: {qkv_bias: 'yes'}\n", "model.qkv_bias"),
    }
    for name, (text, needle) in cases.items():
        path = write(tmp_path / name, text)
        with pytest.raises(UserError) as e:
            load_config(path)
        assert needle in str(e.value), (name, str(e.value))


def test_cli_exit_2_one_line_no_traceback(cli, tmp_path):
    bad = [["model.dpth=3"], ["mae.mask_ratio=1.5"], ["model.img_size=225"], [str(tmp_path / "absent.yaml")]]
    for args in bad:
        r = cli("config", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_prints_resolved_yaml(cli):
    r = cli("config", "configs/default.yaml", "model.depth=6", "data.batch_size=8")
    assert r.returncode == 0, r.stderr
    tree = yaml.safe_load(r.stdout)
    assert tree["model"]["depth"] == 6 and tree["data"]["batch_size"] == 8
    assert set(tree) == {f.name for f in dataclasses.fields(Config)}
    assert to_dict(load_config(None, ["model.depth=6", "data.batch_size=8"])) == tree


def test_config_command_imports_neither_torch_nor_timm():
    """`vit-pretrain config` (and `import pretrain`) stay light: config is a leaf and models' table of
    architectures imports no torch."""
    code = ("import sys, pretrain; from pretrain.cli import main; main(['config', 'configs/default.yaml']); "
            "print('heavy:', [m for m in ('torch', 'timm') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "heavy: []", r.stdout.splitlines()[-1]
