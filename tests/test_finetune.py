"""Fine-tune and linear-probe tasks: init from exported weights, pos-embed resampling, layer decay,
the probe's BatchNorm folded into an exported plain-timm head; end-to-end runs on digits shards."""
import json
import re

import pytest
import torch

import pretrain  # noqa: F401  (timm import fix-up)
from pretrain.config import load_config
from pretrain.engine.consolidate import encoder_state
from pretrain.models.timm_spec import timm_spec
from pretrain.weights import build_timm, save_exported
from pretrain.models import create_model


def export_nano(path, num_classes=0, pool="token"):
    """An exported file as `vit-pretrain export` writes it, from a freshly initialised nano ViT."""
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_16", num_classes=num_classes, global_pool=pool)
    name, kwargs = timm_spec("vit_nano_patch4_16", dict(num_classes=num_classes, global_pool=pool))
    meta = {"timm_name": name, "timm_kwargs": kwargs, "arch": "vit_nano_patch4_16", "img_size": 16,
            "patch_size": 4, "global_pool": pool, "num_classes": num_classes, "mean": None, "std": None}
    save_exported(model.state_dict(), meta, str(path))
    return model


def cfg_for(kind, init_from, *extra):
    return load_config(None, [f"task.kind={kind}", f"finetune.init_from={init_from}",
                              "model.arch=vit_nano_patch4_16", *extra])


def build(cls, cfg, num_classes):
    """A Task that starts from `finetune.init_from`, loaded as the engine loads it."""
    from pretrain.engine.consolidate import load_source

    return cls(cfg, num_classes, load_source(cfg.finetune.init_from))


def test_finetune_resamples_pos_embed_to_a_larger_image(tmp_path):
    from timm.layers import resample_abs_pos_embed

    from pretrain.tasks.finetune import FinetuneTask

    src = export_nano(tmp_path / "enc.safetensors")
    task = build(FinetuneTask, cfg_for("finetune", tmp_path / "enc.safetensors", "model.img_size=32"), 7)
    assert task.encoder.pos_embed.shape == (1, 1 + 8 * 8, 32)
    want = resample_abs_pos_embed(src.pos_embed.detach(), new_size=(8, 8), num_prefix_tokens=1)
    torch.testing.assert_close(task.encoder.pos_embed.detach(), want)
    torch.testing.assert_close(task.encoder.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert task.encoder.head.out_features == 7
    loss, metrics = task(torch.randn(2, 3, 32, 32), torch.tensor([1, 6]))
    assert torch.isfinite(loss) and "acc1" in metrics


def test_finetune_avg_pool_takes_the_class_token_norm(tmp_path):
    from pretrain.tasks.finetune import FinetuneTask

    src = export_nano(tmp_path / "enc.safetensors")
    task = build(FinetuneTask, cfg_for("finetune", tmp_path / "enc.safetensors", "model.global_pool=avg"), 3)
    torch.testing.assert_close(task.encoder.fc_norm.weight, src.norm.weight)


def test_layer_decay_groups(tmp_path):
    from pretrain.tasks.finetune import FinetuneTask

    export_nano(tmp_path / "enc.safetensors")
    cfg = cfg_for("finetune", tmp_path / "enc.safetensors", "finetune.layer_decay=0.5")
    task = build(FinetuneTask, cfg, 3)
    groups = task.param_groups(cfg)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    enc = task.encoder
    # depth 2: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, head 1
    assert scale_of[id(enc.patch_embed.proj.weight)] == pytest.approx(0.125)
    assert scale_of[id(enc.blocks[0].attn.qkv.weight)] == pytest.approx(0.25)
    assert scale_of[id(enc.blocks[1].attn.qkv.weight)] == pytest.approx(0.5)
    assert scale_of[id(enc.head.weight)] == pytest.approx(1.0)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in enc.parameters() if p.requires_grad)
    no_wd = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(enc.pos_embed) in no_wd and id(enc.blocks[0].norm1.weight) in no_wd
    assert id(enc.blocks[0].attn.qkv.weight) not in no_wd


def test_ema_tracks_once_per_optimizer_step(tmp_path):
    from pretrain.tasks.finetune import FinetuneTask

    export_nano(tmp_path / "enc.safetensors")
    cfg = cfg_for("finetune", tmp_path / "enc.safetensors", "finetune.ema_decay=0.5", "optim.accum_steps=2")
    task = build(FinetuneTask, cfg, 3)
    assert not any(p.requires_grad for p in task.ema.parameters())
    assert all(g["params"][0] is not None for g in task.param_groups(cfg))
    ema_ids = {id(p) for p in task.ema.parameters()}
    assert not ema_ids & {id(p) for g in task.param_groups(cfg) for p in g["params"]}
    with torch.no_grad():
        task.encoder.head.bias.fill_(1.0)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    task.train()
    task(x, y, step=4)  # optimizer step 2 (timm copies at step 1): ema <- 0.5 ema + 0.5 w
    task(x, y, step=5)  # same optimizer step: no second update
    assert torch.allclose(task.ema.module.head.bias, torch.full((3,), 0.5))


def test_linprobe_freezes_the_encoder_and_exports_as_plain_timm(tmp_path):
    from pretrain.tasks.linprobe import LinprobeTask

    src = export_nano(tmp_path / "enc.safetensors")
    cfg = cfg_for("linprobe", tmp_path / "enc.safetensors", "model.drop_path_rate=0.1")
    task = build(LinprobeTask, cfg, 4)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable == {"encoder.head.weight", "encoder.head.bias"}
    assert [p for g in task.param_groups(cfg) for p in g["params"]] == [task.encoder.head.weight, task.encoder.head.bias]
    torch.testing.assert_close(task.encoder.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    task.train()
    assert not task.encoder.training and task.head_bn.training
    for _ in range(5):  # move the BatchNorm statistics away from (0, 1)
        task(torch.randn(8, 3, 16, 16) * 3 + 1, torch.randint(0, 4, (8,)))
    with torch.no_grad():
        task.encoder.head.weight.normal_()
        task.encoder.head.bias.normal_()
    task.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = task.predict(x)
    state = encoder_state(task.state_dict())  # what export does to the consolidated checkpoint
    name, kwargs = timm_spec("vit_nano_patch4_16", dict(num_classes=4))
    model = build_timm({"timm_name": name, "timm_kwargs": kwargs}, state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_missing_init_is_a_user_error(tmp_path, cli):
    p = cli("config", "task.kind=finetune")
    assert p.returncode == 2 and "finetune.init_from" in p.stderr
    from pretrain.errors import UserError
    from pretrain.tasks.finetune import FinetuneTask

    with pytest.raises(UserError, match="not found"):
        build(FinetuneTask, cfg_for("finetune", tmp_path / "nope.safetensors"), 3)


# ----------------------------------------------------------------------------- end to end (real CLI)


@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    from pretrain.data.writer import write_shards

    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", str(out), samples_per_shard=300, val_fraction=0.2, seed=0)
    export_nano(out / "enc.safetensors")
    return out


def _last_val(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val/top1" in r][-1]


def _train_export_eval(cli, d, kind, name, *extra):
    run_dir = d / "runs" / name
    p = cli("train", f"task.kind={kind}", f"finetune.init_from={d / 'enc.safetensors'}",
            "model.arch=vit_nano_patch4_16", f"data.train_urls={d / 'train.json'}", f"data.val_urls={d / 'val.json'}",
            "data.batch_size=64", "data.workers=0", "data.hflip=0", "data.crop_scale=[0.6,1.0]", "optim.epochs=8",
            "optim.warmup_epochs=0.5", "model.global_pool=avg",
            f"run.out_dir={d / 'runs'}", f"run.name={name}", "checkpoint.resume=never", "logging.progress=false",
            "logging.images_every_steps=0", "deepspeed.bucket_size=1048576", *extra, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    # the progress bar is off: the run still ends with one line saying what it did and what to run next
    last = p.stderr.strip().splitlines()[-1]
    tag, run = (run_dir / "checkpoints/latest").read_text().strip(), re.escape(str(run_dir))
    assert re.fullmatch(rf"vit-pretrain train: done: {int(tag[5:])} steps, loss \d+\.\d{{4}}, val top-1 [01]\.\d{{4}}; "
                        rf"checkpoint {run}/checkpoints/{tag}, metrics {run}/metrics.jsonl; "
                        rf"export with: vit-pretrain export {run}", last), last
    val = _last_val(run_dir)
    # export and score in-process (the CLIs are covered by test_export / test_eval): plain timm from the file
    from pretrain.evaluation.evaluate import eval_stream, evaluate
    from pretrain.export import export
    from pretrain.weights import load_exported

    export(str(run_dir), out=str(d / f"{name}.safetensors"))
    state, meta = load_exported(str(d / f"{name}.safetensors"))
    stream = eval_stream(str(d / "val.json"), meta, batch_size=128, workers=0)
    ev = evaluate(build_timm(meta, state), stream, "cpu", mean=stream.data.mean, std=stream.data.std)
    return val, ev


@pytest.mark.slow
def test_finetune_run_beats_chance_and_exports(digits16, cli):
    val, ev = _train_export_eval(cli, digits16, "finetune", "ft", "optim.lr_per_256=1e-2", "finetune.layer_decay=0.9",
                                 "model.drop_path_rate=0.1", "deepspeed.zero_stage=2", "finetune.ema_decay=0.9")
    assert val["val/top1"] > 0.3, val  # chance is 0.1
    # the exported file in plain timm scores exactly what the trainer measured
    assert ev["n"] == val["val/n"] == 359
    assert ev["top1"] == pytest.approx(val["val/top1"], abs=1e-9)
    assert ev["loss"] == pytest.approx(val["val/loss"], rel=1e-4)
    from pretrain.export import export

    from pretrain.weights import load_exported

    export(str(digits16 / "runs" / "ft"), out=str(digits16 / "ft_ema.safetensors"), ema=True)
    ema, raw = load_exported(str(digits16 / "ft_ema.safetensors"))[0], load_exported(str(digits16 / "ft.safetensors"))[0]
    assert ema.keys() == raw.keys() and not torch.equal(ema["head.weight"], raw["head.weight"])


@pytest.mark.slow
def test_linprobe_run_beats_chance_and_exports(digits16, cli):
    val, ev = _train_export_eval(cli, digits16, "linprobe", "lp", "optim.lr_per_256=0.1", "optim.weight_decay=0",
                                 "task.label_smoothing=0", "deepspeed.zero_stage=1")
    assert val["val/top1"] > 0.2, val
    # BatchNorm folded into the exported head: same scores in plain timm
    assert ev["top1"] == pytest.approx(val["val/top1"], abs=1e-9)
    assert ev["loss"] == pytest.approx(val["val/loss"], rel=1e-4)
