"""`vit-pretrain visualize`: pictures read back from the PNGs, from models trained for a few real steps
(supervised -> exported file, MAE -> run directory with its decoder) and from random inits."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import run_cli
from pretrain.config import load_config
from pretrain.data.writer import write_shards
from pretrain.engine.consolidate import consolidate, encoder_state
from pretrain.export import export, reference_model
from pretrain.models.timm_spec import timm_spec
from pretrain.weights import build_timm, save_exported
from pretrain.engine.trainer import train
from pretrain.viz.attention import attention
from pretrain.viz.visualize import PANEL, layout, load_image, load_model, visualize
from pretrain.models import create_model

REPO = Path(__file__).resolve().parent.parent
NANO = "vit_nano_patch4_16"  # 4x4 patches, 2 heads, 2 blocks


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A photo-like test image, a supervised run exported to a file, and an MAE run directory."""
    d = tmp_path_factory.mktemp("vis")
    img = Image.new("RGB", (97, 61), (30, 60, 90))  # not square, not the model's size
    pen = ImageDraw.Draw(img)
    pen.ellipse((20, 8, 60, 50), fill=(230, 200, 40))
    pen.rectangle((65, 30, 90, 55), fill=(200, 30, 30))
    img.save(d / "shapes.png")
    write_shards("synthetic:160", str(d / "shards"), samples_per_shard=40, val_fraction=0.2)
    common = [f"data.train_urls={d / 'shards/train.json'}", f"run.out_dir={d / 'runs'}", "optim.max_steps=8",
              "checkpoint.every_steps=8", "data.workers=0", "checkpoint.resume=never"]
    sup = train(load_config(str(REPO / "configs/pretrain/supervised_tiny_cpu.yaml"), common))
    export(sup["run_dir"], out=str(d / "sup.safetensors"))
    mae = train(load_config(str(REPO / "configs/pretrain/mae_tiny_cpu.yaml"), common))
    return {"image": str(d / "shapes.png"), "sup": str(d / "sup.safetensors"), "sup_run": sup["run_dir"],
            "mae": mae["run_dir"], "dir": d}


def _panels(png: str, n_heads: int, mae: bool) -> dict[str, np.ndarray]:
    """Each panel of a written picture as int pixels, after checking the picture's size."""
    width, height, boxes = layout(n_heads, mae)
    img = Image.open(png)
    assert img.size == (width, height) and img.mode == "RGB"
    return {k: np.asarray(img.crop(b), dtype=np.int32) for k, b in boxes.items()}


def _differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_trained_and_random_pictures(trained, tmp_path):
    [png] = visualize([trained["image"]], trained["sup"], str(tmp_path / "trained"))
    [again] = visualize([trained["image"]], trained["sup"], str(tmp_path / "again"))
    [rnd] = visualize([trained["image"]], None, str(tmp_path / "random"), arch=NANO)
    t, r = _panels(png, 2, False), _panels(rnd, 2, False)
    assert Path(png).name == "shapes.png"
    assert open(png, "rb").read() == open(again, "rb").read()  # same weights, same picture
    assert np.array_equal(t["input"], r["input"])  # same preprocessing: the panels line up
    assert _differ(t["head_0"], t["head_1"]) > 1.0  # heads look at different patches
    for key in ("head_0", "head_1", "mean", "rollout"):
        assert _differ(t[key], r[key]) > 1.0, key
    # the maps are the trained model's: the same as from the run's model, built as the trainer built it
    loaded = load_model(trained["sup"])
    _, x = load_image(trained["image"], loaded.meta)
    ref = reference_model(trained["sup_run"], encoder_state(consolidate(trained["sup_run"])[0]),
                          loaded.meta["num_classes"])
    ours, theirs = attention(loaded.encoder, x), attention(ref, x)
    for key in ("heads", "rollout", "logits"):
        assert torch.allclose(ours[key], theirs[key], atol=1e-5), key


def test_mae_run_dir_adds_masked_input_and_reconstruction(trained, tmp_path):
    loaded = load_model(trained["mae"])
    assert loaded.mae is not None and loaded.meta["task"] == "mae"
    [png] = visualize([trained["image"]], trained["mae"], str(tmp_path))
    p = _panels(png, 2, True)
    # sample each patch's centre: visible patches are pasted back unchanged, hidden ones are predicted
    grid = 4
    cell = PANEL // grid
    centres = [(j * cell + cell // 2, i * cell + cell // 2) for j in range(grid) for i in range(grid)]
    same = sum(np.array_equal(p["masked"][y, x], p["reconstruction"][y, x]) for y, x in centres)
    assert same == int(grid * grid * (1 - loaded.mae.mask_ratio))
    assert _differ(p["head_0"], p["head_1"]) > 1.0


def test_no_class_token_uses_the_mean_patch_query(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(timm_spec(NANO, {"num_classes": 0, "global_pool": "avg"})[1], class_token=False)
    meta = {"timm_name": "vit_base_patch16_224", "timm_kwargs": kwargs, "arch": NANO, "num_classes": 0,
            "mean": None, "std": None}
    model = build_timm(meta)
    save_exported(model.state_dict(), meta, str(tmp_path / "avg.safetensors"))
    maps = attention(load_model(str(tmp_path / "avg.safetensors")).encoder, torch.randn(1, 3, 16, 16))
    # no prefix tokens: each query's row is a distribution over the patches, and so is their mean
    assert torch.allclose(maps["heads"].flatten(1).sum(1), torch.ones(2), atol=1e-5)
    assert torch.allclose(maps["rollout"].sum(), torch.tensor(1.0), atol=1e-5)
    # with a class token, its row also attends to itself: the patches get less than all of it
    cls = attention(create_model(NANO, num_classes=0).eval(), torch.randn(1, 3, 16, 16))
    assert (cls["heads"].flatten(1).sum(1) < 1 - 1e-3).all()


@pytest.mark.slow
def test_cli_writes_pictures_and_refuses_bad_images(trained, tmp_path):
    out = tmp_path / "pics"
    p = run_cli("visualize", trained["image"], trained["image"], "--weights", trained["sup"], "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(x.name for x in out.iterdir()) == ["shapes.png", "shapes_2.png"]
    assert p.stdout.split() == [str(out / "shapes.png"), str(out / "shapes_2.png")]
    bad_images = ((tmp_path / "missing.jpg", "image not found"), (trained["dir"] / "sup.json", "not a readable image"))
    for bad, says in bad_images:
        p = run_cli("visualize", str(bad), "--weights", trained["sup"], "--out", str(out))
        assert p.returncode == 2 and says in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    p = run_cli("visualize", trained["image"], "--weights", str(tmp_path / "nothing"), "--out", str(out))
    assert p.returncode == 2 and "weights not found" in p.stderr


def test_attention_capture_leaves_the_forward_unchanged_with_registers_and_qk_norm():
    torch.manual_seed(0)
    model = create_model(NANO, num_classes=3, reg_tokens=4, qk_norm=True).eval()
    x = torch.randn(1, 3, 16, 16)
    before = [blk.attn.fused_attn for blk in model.blocks]
    with torch.no_grad():
        fused = model(x)
    maps = attention(model, x)
    torch.testing.assert_close(maps["logits"], fused[0], atol=1e-5, rtol=1e-5)  # unfused = fused
    assert [blk.attn.fused_attn for blk in model.blocks] == before  # restored
    assert not any(blk.attn.attn_drop._forward_hooks for blk in model.blocks)
    assert maps["heads"].shape == (2, 4, 4) and maps["rollout"].shape == (4, 4)  # registers are not patches


@pytest.mark.parametrize("kwargs", [dict(global_pool="avg"), dict(class_token=False, reg_tokens=2, global_pool="avg")],
                         ids=["mean-pooled", "registers-no-class-token"])
def test_tensorboard_and_visualize_draw_the_same_map(kwargs):
    """TensorBoard's attention picture reads the query the head reads (the mean patch query here), as
    `visualize` does: its overlay, read back pixel by pixel, is visualize's last-block mean map, and not
    the first prefix token's row (what it drew before: the class token's, or a register's)."""
    import timm

    from pretrain.viz.tensorboard import attention_grid

    torch.manual_seed(0)
    enc = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            num_classes=0, **kwargs).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1  # normalised with mean = std = 0.5: images in [0, 1], no clamping
    grid = attention_grid(enc, x, (0.5,) * 3, (0.5,) * 3)  # (3, 34, 67): image tile, then overlay tile
    image, overlay = grid[0, 1:33, 1:33], grid[0, 1:33, 34:66]
    heat = ((overlay - 0.4 * image) / 0.6)[4::8, 4::8]  # red channel; one value per 8-px patch: (4, 4)
    mean = attention(enc, x)["mean"]
    want = (mean - mean.min()) / (mean.max() - mean.min())
    torch.testing.assert_close(heat, want, atol=2e-3, rtol=0)
    # the row the old picture drew (token 0: the class token, or the first register) is another map
    from pretrain.viz.attention import unfused_attention

    with unfused_attention(enc) as probs, torch.no_grad():
        enc.forward_features(x)
    first = probs[-1][0, :, 0, enc.num_prefix_tokens:].mean(0).reshape(4, 4)
    first = (first - first.min()) / (first.max() - first.min())
    assert (first - want).abs().max() > 0.05
