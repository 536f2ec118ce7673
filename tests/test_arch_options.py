"""Architecture options (`model.reg_tokens`, `init_values`, `qk_norm`, `mlp`, `pos_embed`, `patch_drop_rate`,
`rope`, `conv_stem`, `dynamic_img_size`, the named configurations): each trains a few real steps, exports, and
loads into plain timm from the exported JSON alone with strict=True and equal logits; unsound combinations are
user errors."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import GluMlp, LayerScale

from pretrain.config import load_config
from pretrain.data.writer import write_shards
from pretrain.engine.consolidate import consolidate, encoder_state
from pretrain.export import export, reference_model
from pretrain.weights import fixed_input
from pretrain.engine.trainer import train
from pretrain.errors import UserError
from pretrain.models.archs import check_model_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards("synthetic:64", str(out), samples_per_shard=32, val_fraction=0.0)
    return out


def _train_export(shards, tmp_path, recipe: str, *options: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
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

    from pretrain.viz.visualize import layout, visualize
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


# ----------------------------------------------------------------------------- pos_embed none, patch dropout,
# RoPE, conv stem, dynamic image size: five trainings cover every option in every task


def test_rope_without_abs_positions_and_patch_dropout_then_finetune_at_a_larger_size(shards, tmp_path):
    model, _ = _train_export(shards, tmp_path / "sup", "supervised_tiny_cpu", "model.rope=true",
                             "model.pos_embed=none", "model.patch_drop_rate=0.5", "model.mlp=swiglu",
                             "model.mlp_ratio=4", "deepspeed.zero_stage=3")
    from timm.models.eva import Eva

    assert isinstance(model, Eva) and model.rope is not None and model.pos_embed is None
    assert isinstance(model.blocks[0].mlp, GluMlp) and model.blocks[0].mlp.fc1.out_features == 128
    # fine-tune the export on 32 px images (an 8 x 8 grid instead of 4 x 4) that also takes other sizes
    ft, _ = _train_export(shards, tmp_path / "ft", "supervised_tiny_cpu", "task.kind=finetune",
                          f"finetune.init_from={tmp_path / 'sup' / 'out.safetensors'}", "model.rope=true",
                          "model.pos_embed=none", "model.mlp=swiglu", "model.mlp_ratio=4", "model.img_size=32",
                          "model.dynamic_img_size=true", "model.patch_drop_rate=0.25")
    assert ft.patch_embed.grid_size == (8, 8)
    with torch.no_grad():
        assert ft(torch.randn(2, 3, 24, 24)).shape == (2, 10)  # plain timm, a third size


def test_conv_stem_no_positions_dynamic_size_then_linear_probe(shards, tmp_path):
    model, _ = _train_export(shards, tmp_path / "sup", "supervised_tiny_cpu", "model.conv_stem=true",
                             "model.pos_embed=none", "model.dynamic_img_size=true", "model.patch_drop_rate=0.75")
    from timm.layers import HybridEmbed

    assert isinstance(model.patch_embed, HybridEmbed) and model.pos_embed is None
    assert model.patch_embed.grid_size == (4, 4)  # 16 px / (stem stride 4 x projection 1): the nano grid
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    probe, _ = _train_export(shards, tmp_path / "lp", "supervised_tiny_cpu", "task.kind=linprobe",
                             f"finetune.init_from={tmp_path / 'sup' / 'out.safetensors'}", "model.conv_stem=true",
                             "model.pos_embed=none", "model.dynamic_img_size=true", "model.patch_drop_rate=0.75")
    assert isinstance(probe.patch_embed, HybridEmbed)


def test_mae_with_rope_registers_and_no_abs_positions_at_zero3(shards, tmp_path):
    model, _ = _train_export(shards, tmp_path, "mae_tiny_cpu", "model.rope=true", "model.pos_embed=none",
                             "model.reg_tokens=2", "deepspeed.zero_stage=3")
    assert model.num_prefix_tokens == 3 and model.rope is not None


@pytest.mark.parametrize("options", [{"rope": True, "reg_tokens": 2}, {"rope": True, "pos_embed": "none"},
                                     {"pos_embed": "none", "reg_tokens": 1}])
def test_mae_encoder_gives_each_visible_patch_its_own_position(options):
    """With nothing hidden (mask ratio 0) the encoder sees every patch in a shuffled order: attention is
    permutation-equivariant, so its outputs must be the full forward's, shuffled the same way, which holds only
    if every token kept its own rotation (RoPE) or embedding."""
    from pretrain.models import create_model
    from pretrain.models.mae import MaskedAutoencoder

    enc = create_model("vit_nano_patch4_16", num_classes=0, **options).eval()
    mae = MaskedAutoencoder(enc, mask_ratio=0.0, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2).eval()
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        latent, _, _ = mae.forward_encoder(x, noise)
        full = enc.forward_features(x)
    p = enc.num_prefix_tokens
    shuffled = torch.gather(full[:, p:], 1, torch.argsort(noise, 1)[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(latent[:, p:], shuffled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(latent[:, :p], full[:, :p], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", [False, True])
def test_patch_dropout_keeps_prefix_tokens_and_follows_the_step_seed(rope):
    """Patch dropout draws from torch's global generator, which the trainer seeds per micro-batch from
    (seed, micro-batch, rank): the same key gives the same kept patches, another key others."""
    from pretrain.models import create_model
    from pretrain.rng import seed_all

    enc = create_model("vit_nano_patch4_16", num_classes=3, reg_tokens=1, rope=rope, patch_drop_rate=0.75).train()
    seen = []
    enc.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    x = torch.randn(2, 3, 16, 16)
    outs = []
    for key in [(0, 7, 0), (0, 7, 0), (0, 8, 0)]:
        seed_all(*key)
        outs.append(enc(x))
    assert seen == [2 + 4] * 3  # class + register token, and 16 * (1 - 0.75) patches
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert not torch.allclose(outs[0], outs[2])
    enc.eval()
    enc(x)
    assert seen[-1] == 2 + 16  # no dropout at evaluation


def _load_checked(overrides: list[str]):
    """Load, then check the architecture the model section names, as a run's entry point does."""
    cfg = load_config(None, overrides)
    check_model_config(cfg.model, cfg.task.kind)
    return cfg


def test_unsound_combinations_are_user_errors():
    with pytest.raises(UserError, match=r"model.patch_drop_rate: got 0.5, is for supervised.*mae.mask_ratio"):
        _load_checked(["task.kind=mae", "model.patch_drop_rate=0.5"])
    with pytest.raises(UserError, match=r"model.conv_stem.*masked pixels.*model.conv_stem=false"):
        _load_checked(["task.kind=mae", "model.conv_stem=true"])
    with pytest.raises(UserError, match=r"model.rope.*conv_stem"):
        _load_checked(["model.conv_stem=true", "model.rope=true"])
    with pytest.raises(UserError, match=r"model.mlp: got 'swiglu'.*conv_stem"):
        _load_checked(["model.conv_stem=true", "model.mlp=swiglu"])
    with pytest.raises(UserError, match=r"model.patch_size: got 6.*multiple of 4"):
        _load_checked(["model.conv_stem=true", "model.patch_size=6", "model.img_size=24"])
    with pytest.raises(UserError, match=r"model.patch_drop_rate: got 1.0"):
        _load_checked(["model.patch_drop_rate=1.0"])
    with pytest.raises(UserError, match=r"model.pos_embed"):
        _load_checked(["model.pos_embed=rope"])
    with pytest.raises(UserError, match=r"model.mlp_ratio: got 5.333, gives an odd SwiGLU width \(1023"):
        _load_checked(["model.mlp=swiglu", "model.mlp_ratio=5.333", "model.arch=vit_tiny_patch16_224"])


@pytest.mark.parametrize("name", ["vit_nano_patch4_reg4_ls_16", "vit_nano_patch4_rope_swiglu_16"])
def test_named_configurations_carry_their_options_into_plain_timm(name):
    from timm.models.eva import Eva

    from pretrain.models.timm_spec import timm_spec
    from pretrain.models import create_model, list_models, model_kwargs

    assert {"vit_small_patch14_reg4_ls_224", "vit_base_patch14_rope_swiglu_224", name} <= set(list_models())
    cfg = load_config(None, [f"model.arch={name}"])
    kwargs = model_kwargs(cfg.model, 3)
    model = create_model(name, **kwargs).eval()
    if "reg4" in name:
        assert model.num_prefix_tokens == 5 and isinstance(model.blocks[0].ls1, LayerScale)
        # a field set away from its default overrides the name's value
        assert model_kwargs(load_config(None, [f"model.arch={name}", "model.reg_tokens=1"]).model, 3)["reg_tokens"] == 1
    else:
        assert isinstance(model, Eva) and model.rope is not None and isinstance(model.blocks[0].mlp, GluMlp)
    timm_name, timm_kwargs = timm_spec(name, kwargs)
    plain = timm.create_model(timm_name, pretrained=False, **json.loads(json.dumps(timm_kwargs))).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)


def test_bench_options_reports_each_option_against_the_plain_vit():
    import argparse

    from pretrain.bench import options

    args = argparse.Namespace(options_arch="vit_nano_patch4_16", options_img_size=16, options_batch=4,
                              options_steps=1, options_rounds=1, quick=True)
    rows = {r["name"]: r for r in options.run(args)}
    assert {"options: patch_drop=0.5", "options: patch_drop=0.75", "options: rope", "options: conv_stem"} <= set(rows)
    for r in rows.values():
        assert r["ratio"] == pytest.approx(r["ours"] / r["baseline"]) and r["ours"] > 0
