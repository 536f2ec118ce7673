"""Architecture options (`model.reg_tokens`, `init_values`, `qk_norm`, `mlp`): each trains a few real steps,
exports, and loads into plain timm from the exported JSON alone with strict=True and equal logits."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import GluMlp, LayerScale

from pretrain.config import load_config
from pretrain.data.writer import write_shards
from pretrain.engine.export import consolidate, encoder_state, export, fixed_input, reference_model
from pretrain.engine.trainer import train
from pretrain.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards("synthetic:64", str(out), samples_per_shard=32, val_fraction=0.0)
    return out


def _train_export(shards, tmp_path, recipe: str, *options: str):
    cfg = load_config(str(REPO / f"configs/pretrain/{recipe}.yaml"), [
        f"data.train_urls={shards}/train.json", f"run.out_dir={tmp_path}", "optim.max_steps=3",
        "checkpoint.every_steps=3", "data.workers=0", *options])
    run_dir = train(cfg)["run_dir"]
    export(run_dir, out=str(tmp_path / "out.safetensors"))  # raises unless timm reproduces the run
    meta = json.loads((tmp_path / "out.json").read_text())
    # what a user does, with nothing of ours: plain timm from the JSON, strict
    model = timm.create_model(meta["timm_name"], pretrained=False, **meta["timm_kwargs"]).eval()
    model.load_state_dict(load_file(tmp_path / "out.safetensors"), strict=True)
    ref = reference_model(run_dir, encoder_state(consolidate(run_dir)[0]), meta["num_classes"])
    x = fixed_input(meta)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    return model, run_dir


def test_register_tokens(shards, tmp_path):
    model, _ = _train_export(shards, tmp_path, "supervised_tiny_cpu", "model.reg_tokens=4")
    assert model.reg_token.shape == (1, 4, 32) and model.num_prefix_tokens == 5


def test_layerscale(shards, tmp_path):
    model, _ = _train_export(shards, tmp_path, "supervised_tiny_cpu", "model.init_values=0.1")
    assert isinstance(model.blocks[0].ls1, LayerScale)
    assert not torch.allclose(model.blocks[0].ls1.gamma, torch.full((32,), 0.1))  # trained, not the init


def test_qk_norm(shards, tmp_path):
    model, _ = _train_export(shards, tmp_path, "supervised_tiny_cpu", "model.qk_norm=true")
    assert isinstance(model.blocks[0].attn.q_norm, torch.nn.LayerNorm)


def test_swiglu_at_zero3(shards, tmp_path):
    model, _ = _train_export(shards, tmp_path, "supervised_tiny_cpu", "model.mlp=swiglu", "model.mlp_ratio=4",
                             "deepspeed.zero_stage=3")
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, GluMlp) and isinstance(mlp.act, torch.nn.SiLU)
    assert mlp.fc1.out_features == 128 and mlp.fc2.in_features == 64  # packed value + gate
    assert not isinstance(model.blocks[0].ls1, LayerScale)  # the SwiGLU factory's LayerScale default is off


def test_mae_with_every_option_at_zero3(shards, tmp_path):
    model, run_dir = _train_export(shards, tmp_path, "mae_tiny_cpu", "model.reg_tokens=2", "model.init_values=1e-5",
                             "model.qk_norm=true", "model.mlp=swiglu", "model.pos_embed=sincos",
                             "deepspeed.zero_stage=3")
    assert model.num_prefix_tokens == 3 and isinstance(model.blocks[0].mlp, GluMlp)
    # the run directory draws: attention past the registers, the decoder's reconstruction
    from PIL import Image

    from pretrain.engine.visualize import layout, visualize
    from pretrain.tasks.mae import MaeTask

    Image.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy()).save(tmp_path / "noise.png")
    [png] = visualize([str(tmp_path / "noise.png")], run_dir, str(tmp_path / "pics"))
    assert Image.open(png).size == layout(2, True)[:2]

    cfg = load_config(str(REPO / "configs/pretrain/mae_tiny_cpu.yaml"), ["model.reg_tokens=2"])
    task = MaeTask(cfg)
    latent, mask, _ = task.forward_encoder(torch.randn(2, 3, 16, 16), torch.rand(2, 16))
    assert latent.shape == (2, 3 + 4, 32) and mask.sum() == 2 * 12  # class + registers + the 4 visible patches


def test_bad_option_values_are_user_errors():
    with pytest.raises(UserError, match="model.reg_tokens"):
        load_config(None, ["model.reg_tokens=-1"])
    with pytest.raises(UserError, match="model.init_values"):
        load_config(None, ["model.init_values=0"])
    with pytest.raises(UserError, match="model.mlp"):
        load_config(None, ["model.mlp=relu"])


def test_weights_with_other_options_are_a_user_error():
    from pretrain.models import create_model, load_weights

    src = create_model("vit_nano_patch4_16", num_classes=0, reg_tokens=4, mlp="swiglu")
    with pytest.raises(UserError, match="pos_embed.*model.. options"):
        load_weights(create_model("vit_nano_patch4_16", num_classes=0), src.state_dict())
    load_weights(create_model("vit_nano_patch4_16", num_classes=5, img_size=32, reg_tokens=4, mlp="swiglu"),
                 src.state_dict(), new_head=True)  # the same options load, resampled to a larger image
