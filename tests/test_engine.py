"""The training engine on one process: real DeepSpeed engines (CPU, gloo), real shards written by the
real writer, real DataLoader workers, TensorBoard files read back."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import metrics_rows
from pretrain.config import load_config
from pretrain.data.writer import write_shards
from pretrain.engine import checkpoint as ckpt
from pretrain.engine.ds import Precision, build_ds_config
from pretrain.engine.schedule import build_schedule
from pretrain.engine.trainer import NonFiniteError, train

REPO = Path(__file__).resolve().parent.parent
TINY_MAE = str(REPO / "configs/pretrain/mae_tiny_cpu.yaml")
TINY_SUP = str(REPO / "configs/pretrain/supervised_tiny_cpu.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards("synthetic:160", str(out), samples_per_shard=40, val_fraction=0.2)
    return out


def _cfg(path, shards, tmp_path, *extra):
    return load_config(path, [f"data.train_urls={shards}/train.json", f"run.out_dir={tmp_path}", *extra])




def _tb(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


# ------------------------------------------------------------------------------------- pure parts

def test_schedule_scales_warms_up_and_decays():
    cfg = load_config(None, ["optim.lr_per_256=1e-3", "optim.warmup_steps=4", "optim.min_lr=1e-5"])
    s = build_schedule(cfg.optim, effective_batch=512, steps_per_epoch=10, total_steps=20)
    step = lambda i: s(i * 512, 512)  # noqa: E731  the lr of optimizer step i at a constant batch
    assert s.peak_lr == pytest.approx(2e-3)
    assert [step(i) for i in range(4)] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3])
    assert step(4) == pytest.approx(2e-3)
    assert step(12) == pytest.approx(1e-5 + (2e-3 - 1e-5) * 0.5)
    assert step(19) > step(20 - 1 + 100) == pytest.approx(1e-5)
    warm_epochs = build_schedule(load_config(None, ["optim.warmup_epochs=1.5"]).optim, 256, 10, 100)
    assert warm_epochs.warmup_samples == 15 * 256


def test_schedule_keeps_its_place_in_images_when_the_batch_changes():
    """A resume on half the GPUs (half the effective batch) continues warm-up and cosine where the
    checkpoint left them; only the peak follows the new batch (linear scaling)."""
    cfg = load_config(None, ["optim.lr_per_256=1e-3", "optim.warmup_epochs=1", "optim.min_lr=0"])
    old = build_schedule(cfg.optim, effective_batch=512, steps_per_epoch=10, total_steps=40)
    new = build_schedule(cfg.optim, effective_batch=256, steps_per_epoch=20, total_steps=80,
                         horizon=old.state_dict())
    assert new.peak_lr == pytest.approx(old.peak_lr / 2)
    assert (new.warmup_samples, new.total_samples) == (10 * 512, 40 * 512)
    # mid warm-up (after 6 steps of 512): the next 256 images are 6.5/10 of the way up, at the new peak
    assert new(6 * 512, 256) == pytest.approx(new.peak_lr * 6.5 / 10)
    # mid cosine (after 25 steps of 512): the same fraction of the way down as the old run would be
    for seen in (25 * 512, 33 * 512):
        assert new(seen, 256) / new.peak_lr == pytest.approx(old(seen, 512) / old.peak_lr)
    # half the images of the horizon's cosine part seen: half-way down (a per-step schedule re-derived
    # from the new batch, as a resume did before, would put step 25 of 80 at 0.98 of the peak)
    assert new(25 * 512, 256) == pytest.approx(new.peak_lr * 0.5)  # half-way down the cosine


def test_ds_config_derives_batch_fields_and_merges_extra():
    cfg = load_config(None, ["data.batch_size=16", "optim.accum_steps=4", "optim.grad_clip=1.0",
                             "deepspeed.zero_stage=3", "deepspeed.offload_params=true",
                             'deepspeed.extra={"zero_optimization": {"stage3_max_live_parameters": 7}, "foo": 1}'])
    ds = build_ds_config(cfg, world_size=8, precision=Precision("fp32", None, torch.float32))
    assert ds["train_batch_size"] == 16 * 4 * 8
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 1.0
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"]["device"] == "cpu" and z["stage3_max_live_parameters"] == 7
    assert ds["foo"] == 1 and ds["fp16"]["enabled"] is False


def test_prune_keeps_the_newest_and_never_latest(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / ckpt.tag_of(step)).mkdir()
    (tmp_path / "latest").write_text(ckpt.tag_of(3))  # step 4 is an incomplete save
    ckpt.prune(str(tmp_path), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", ckpt.tag_of(2), ckpt.tag_of(3), ckpt.tag_of(4)]


# ------------------------------------------------------------------------------------- real runs

@pytest.mark.slow
def test_supervised_run_writes_run_dir_and_learns(shards, tmp_path):
    # the tiny classifier's loss sits at chance (~2.30) for its first ~30 steps; 48 show it falling
    cfg = _cfg(TINY_SUP, shards, tmp_path, f"data.val_urls={shards}/val.json", "optim.max_steps=48",
               "checkpoint.every_steps=16", "checkpoint.keep=2", "logging.images_every_steps=24")
    result = train(cfg)
    run = Path(result["run_dir"])
    assert result["step"] == 48 and not result["stopped_early"]
    model = json.loads((run / "model.json").read_text())
    assert model["task"] == "supervised" and model["num_classes"] == 10
    assert model["create_model"]["name"] == "vit_nano_patch4_16"
    assert load_config(str(run / "config.yaml")) == cfg
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000048"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000032", "step_00000048"]
    rows = metrics_rows(run)
    assert sorted(rows) == list(range(1, 49))
    for key in ("epoch", "samples", "loss", "lr", "grad_norm", "images_per_sec", "data_wait", "flops_per_sec"):
        assert key in rows[48], key
    assert rows[48]["samples"] == 48 * cfg.data.batch_size
    first = sum(rows[s]["loss"] for s in range(1, 7)) / 6
    last = sum(rows[s]["loss"] for s in range(43, 49)) / 6
    assert last < first - 0.05, (first, last)
    assert 0.0 <= result["val_top1"] <= 1.0 and result["val_n"] == 32
    tb = _tb(run)
    tags = tb.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_sec", "val/top1", "val/top5"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in tb.Scalars("train/loss")] == list(range(1, 49))
    assert "attention/last_block" in tags["images"]
    img = tb.Images("attention/last_block")[-1]
    assert img.step == 48 and img.width > 16 and img.height > 16


@pytest.mark.slow
def test_mae_run_logs_reconstructions(shards, tmp_path):
    """MAE on a mixture of two sources (the second one unlabelled): reconstructions, k-NN and per-source counts
    in TensorBoard."""
    write_shards("digits", str(tmp_path / "digits"), samples_per_shard=200)  # labelled with other classes
    mixture = (f"data.sources=[{{train_urls: {shards}/train.json, weight: 3, name: synth}}, "
               f"{{train_urls: {tmp_path}/digits/train.json, weight: 1, name: digits}}]")
    cfg = load_config(TINY_MAE, [mixture, f"run.out_dir={tmp_path}", "optim.max_steps=6", "logging.every_steps=2",
                                 "logging.images_every_steps=3", "eval.knn_every_steps=3",
                                 f"eval.knn_train_urls={shards}/train.json", f"eval.knn_val_urls={shards}/val.json"])
    result = train(cfg)
    run = Path(result["run_dir"])
    assert json.loads((run / "model.json").read_text())["create_model"]["num_classes"] == 0
    assert sorted(metrics_rows(run)) == [2, 4, 6]
    tb = _tb(run)
    seen = {name: [e.value for e in tb.Scalars(f"data/{name}/samples")] for name in ("synth", "digits")}
    batch = cfg.data.batch_size
    assert [a + b for a, b in zip(seen["synth"], seen["digits"])] == [2 * batch, 4 * batch, 6 * batch]
    assert abs(seen["digits"][-1] / (6 * batch) - 0.25) < 0.05
    assert [e.value for e in tb.Scalars("data/digits/bad")] == [0, 0, 0]
    images = tb.Tags()["images"]
    assert "mae/input_masked_reconstruction" in images and "attention/last_block" in images
    assert [e.step for e in tb.Images("mae/input_masked_reconstruction")] == [3, 6]
    assert [e.step for e in tb.Scalars("knn/top1")] == [3, 6]
    assert all(0.0 <= e.value <= 1.0 for e in tb.Scalars("knn/top1"))
    grid = tb.Images("mae/input_masked_reconstruction")[0]
    assert grid.width > grid.height // 4  # rows of (input, masked, reconstruction)
    sd = torch.load(run / "checkpoints/step_00000006/mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert "encoder.pos_embed" in sd and "decoder_embed.weight" in sd


def _signal_at(monkeypatch, task_cls, micro_step, sig=signal.SIGTERM):
    orig = task_cls.forward

    def forward(self, images, targets=None, step=0):
        if step == micro_step:
            os.kill(os.getpid(), sig)
        return orig(self, images, targets, step)

    monkeypatch.setattr(task_cls, "forward", forward)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_and_resume_gives_identical_losses(shards, tmp_path, monkeypatch, sig):
    """Interrupted after a checkpoint (signal at step 5 of 9, crossing an epoch), resumed: same losses."""
    from pretrain.tasks.mae import MaeTask

    common = ["optim.max_steps=9", "checkpoint.every_steps=3", "data.batch_size=16"]  # 8 steps per epoch
    ref = train(_cfg(TINY_MAE, shards, tmp_path, "run.name=ref", *common))
    with monkeypatch.context() as m:
        _signal_at(m, MaeTask, micro_step=4, sig=sig)
        cut = train(_cfg(TINY_MAE, shards, tmp_path, "run.name=cut", *common))
    assert cut["stopped_early"] and cut["step"] == 5
    ck = tmp_path / "cut/checkpoints"
    assert ckpt.read_latest(str(ck)) == "step_00000005"
    assert ckpt.read_meta(str(ck), "step_00000005")["step"] == 5
    resumed = train(_cfg(TINY_MAE, shards, tmp_path, "run.name=cut", *common))
    assert resumed["step"] == 9 and not resumed["stopped_early"] and resumed["epoch"] == 1
    a, b = metrics_rows(tmp_path / "ref"), metrics_rows(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 10))
    for s in a:
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-6, abs=1e-7), s
        assert b[s]["lr"] == pytest.approx(a[s]["lr"])


def test_nonfinite_steps_are_skipped_counted_then_stop(shards, tmp_path, monkeypatch):
    from pretrain.tasks.supervised import SupervisedTask

    orig = SupervisedTask.forward

    def forward(self, images, targets=None, step=0):
        loss, metrics = orig(self, images, targets, step)
        return (loss * float("nan"), metrics) if step in (2, 3) else (loss, metrics)

    monkeypatch.setattr(SupervisedTask, "forward", forward)
    cfg = _cfg(TINY_SUP, shards, tmp_path, "optim.max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep=3",
               "optim.grad_clip=1.0", "deepspeed.zero_stage=0")  # the device-side skip
    result = train(cfg)
    assert result["skipped_steps"] == 2 and result["step"] == 6
    rows = metrics_rows(Path(result["run_dir"]))
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 0, 0]
    assert rows[3]["loss"] is None and rows[5]["loss"] is not None
    # the skipped steps 3 and 4 made no update: step 4's weights, Adam moments and step counts are step 2's
    ck = Path(result["run_dir"]) / "checkpoints"
    two, four = (torch.load(ck / f"step_0000000{s}/mp_rank_00_model_states.pt", weights_only=False)
                 for s in (2, 4))
    assert all(torch.equal(two["module"][k], v) for k, v in four["module"].items())
    for a, b in zip(two["optimizer"]["state"].values(), four["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq")) and int(b["step"]) == 2
    six = torch.load(ck / "step_00000006/mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in six["module"].values())
    assert all(int(st["step"]) == 4 for st in six["optimizer"]["state"].values())

    def always_nan(self, images, targets=None, step=0):
        loss, metrics = orig(self, images, targets, step)
        return (loss * float("nan"), metrics) if step >= 2 else (loss, metrics)

    monkeypatch.setattr(SupervisedTask, "forward", always_nan)
    for stage in (0, 2):
        cfg = _cfg(TINY_SUP, shards, tmp_path, f"run.name=nan{stage}", "optim.max_steps=20",
                   "checkpoint.every_steps=2", "optim.max_nonfinite_steps=3", f"deepspeed.zero_stage={stage}")
        with pytest.raises(NonFiniteError, match=r"3 consecutive .* step 5: non-finite loss on rank 0 \(nan\); "
                                                 r".*last good checkpoint: .*step_00000004"):
            train(cfg)
    # logged every 4 steps: the skips (from step 3) are read at step 4, the limit is reached at step 5, and
    # the run stops at the next logging step, 8, still without an update
    cfg = _cfg(TINY_SUP, shards, tmp_path, "run.name=window", "optim.max_steps=20", "checkpoint.every_steps=2",
               "optim.max_nonfinite_steps=3", "logging.every_steps=4", "deepspeed.zero_stage=0")
    with pytest.raises(NonFiniteError, match=r"6 consecutive .* step 8: non-finite loss on rank 0 \(nan\); "
                                             r".*last good checkpoint: .*step_00000006"):
        train(cfg)
    assert metrics_rows(tmp_path / "window")[4]["skipped_steps"] == 2


@pytest.mark.parametrize("path,extra", [
    (TINY_MAE, ["deepspeed.precision=bf16", "model.grad_checkpointing=true", "model.pos_embed=sincos"]),
    (TINY_MAE, ["optim.accum_steps=2", "deepspeed.zero_stage=3", "optim.grad_clip=1.0"]),
    (TINY_SUP, ["task.mixup_alpha=0.8", "task.cutmix_alpha=1.0", "deepspeed.zero_stage=1", "data.workers=0"]),
    (TINY_SUP, ["deepspeed.zero_stage=0", "optim.accum_steps=2", "model.drop_path_rate=0.1"]),
])
def test_engine_variants_train(shards, tmp_path, path, extra):
    cfg = _cfg(path, shards, tmp_path, "optim.max_steps=4", "checkpoint.every_steps=0", *extra)
    result = train(cfg)
    rows = metrics_rows(result["run_dir"])
    assert sorted(rows) == [1, 2, 3, 4] and result["skipped_steps"] == 0
    assert all(r["loss"] is not None and r["grad_norm"] is not None for r in rows.values())
    assert rows[4]["samples"] == 4 * cfg.data.batch_size * cfg.optim.accum_steps
    derived = json.loads((Path(result["run_dir"]) / "derived.json").read_text())
    assert derived["effective_batch"] == cfg.data.batch_size * cfg.optim.accum_steps
    assert derived["peak_lr"] == pytest.approx(cfg.optim.lr_per_256 * derived["effective_batch"] / 256)
    assert (Path(result["run_dir"]) / "checkpoints/latest").read_text().strip() == "step_00000004"


def test_recipes_hold_the_papers_values():
    mae_b = load_config(str(REPO / "configs/pretrain/mae_vit_base_patch16.yaml"))
    mae_l = load_config(str(REPO / "configs/pretrain/mae_vit_large_patch16.yaml"))
    deit = load_config(str(REPO / "configs/pretrain/supervised_vit_base_patch16_deit.yaml"))
    for c in (mae_b, mae_l):
        assert c.task.kind == "mae" and c.mae.mask_ratio == 0.75 and c.mae.norm_pix_loss
        assert (c.mae.decoder_depth, c.mae.decoder_embed_dim) == (8, 512)
        assert c.optim.lr_per_256 == 1.5e-4 and c.optim.betas == [0.9, 0.95] and c.optim.warmup_epochs == 40
        assert c.data.crop_scale == [0.2, 1.0]
    assert mae_b.model.arch == "vit_base_patch16_224" and mae_l.model.arch == "vit_large_patch16_224"
    assert mae_l.data.batch_size * mae_l.optim.accum_steps * 32 == 4096
    assert deit.optim.lr_per_256 * 1024 / 256 == pytest.approx(1e-3)  # 5e-4 per 512 at batch 1024
    assert (deit.task.mixup_alpha, deit.task.cutmix_alpha, deit.data.reprob) == (0.8, 1.0, 0.25)
    # experiment files hold only what differs from the defaults
    import yaml
    for f in (REPO / "configs/pretrain").glob("*.yaml"):
        tree = yaml.safe_load(f.read_text())
        assert tree["_base_"] in ("../default.yaml", "mae_vit_base_patch16.yaml"), f


def test_bucket_size_fitted_to_the_model():
    from pretrain.engine.ds import bucket_elements

    cfg = load_config(None, ["deepspeed.zero_stage=3"])
    ds = build_ds_config(cfg, world_size=2, precision=Precision("fp32", None, torch.float32),
                         num_params=22_000_000, hidden=384)
    z = ds["zero_optimization"]
    assert z["reduce_bucket_size"] == z["allgather_bucket_size"] == z["stage3_prefetch_bucket_size"]
    assert 5_500_000 <= z["reduce_bucket_size"] < 5_500_000 + 1024  # a quarter of the parameters
    assert z["stage3_param_persistence_threshold"] == 3840
    assert bucket_elements(0, 10_000, 128) == 128 * 128          # tiny model: at least hidden^2
    assert 50_000_000 <= bucket_elements(0, 600_000_000, 1280) < 50_000_000 + 1024  # ViT-H: capped
    for n in (1_000_001, 22_050_667, 86_567_659):                # DeepSpeed asserts the alignment
        assert bucket_elements(0, n, 384) % 1024 == 0
    assert bucket_elements(123, 600_000_000, 1280) == 123        # an explicit size wins


# ------------------------------------------------------------------------------------- ragged steps
def test_ragged_step_learns_from_its_real_samples_only(tmp_path):
    """After a re-layout an epoch can end in a ragged step: padding samples carry weight 0 and the step's
    loss is averaged over its real samples (over ranks and micro-batches). One step of 2 micro-batches of 4,
    3 real samples in all, must update the weights exactly as one step on those 3 samples alone."""
    import threading

    from pretrain import dist as pdist
    from pretrain.bench.step import MemoryStream, bench_config
    from pretrain.engine.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (8, 3, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)

    class Ragged(MemoryStream):
        def __init__(self, batches):
            super().__init__(x, y, 10)
            self.batches = batches

        def iter_epoch_weighted(self, epoch):
            yield from self.batches

    def one_step(batch, accum, batches):
        cfg = bench_config("vit_nano_patch4_16", 16, batch, 0, "supervised", str(tmp_path / str(accum)),
                           [f"optim.accum_steps={accum}", "optim.grad_clip=0"])
        trainer = Trainer(cfg, pdist.setup(), threading.Event(), stream=Ragged(batches))
        names = {p: n for n, p in trainer.engine.module.named_parameters()}
        grads = {}
        opt = trainer.engine.optimizer
        opt = getattr(opt, "optimizer", opt)  # the torch AdamW under DeepSpeed's wrapper, if any
        opt.register_step_pre_hook(lambda o, *_: grads.update(
            {names[p]: p.grad.detach().clone() for group in o.param_groups for p in group["params"]}))
        trainer.train_steps(1)
        assert grads, "no gradient captured"
        return grads  # what the step applied (AdamW itself would hide a scale: its first step is ~lr*sign(g))

    w1, w2 = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.zeros(4)  # padding: x[1], then all of x[4:8]
    ragged = one_step(4, 2, [(x[:4], y[:4], w1, 3), (x[4:], y[4:], w2, 3)])
    alone = one_step(3, 1, [(x[[0, 2, 3]], y[[0, 2, 3]], None, None)])
    unweighted = one_step(4, 2, [(x[:4], y[:4], None, None), (x[4:], y[4:], None, None)])
    for name in alone:
        torch.testing.assert_close(ragged[name], alone[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.allclose(unweighted[n], alone[n]) for n in alone)  # the weights did matter


def test_mae_loss_leaves_padding_out():
    from pretrain.config import load_config
    from pretrain.tasks.mae import MaeTask

    cfg = load_config(TINY_MAE, [])
    task = MaeTask(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g)
    noise = torch.rand(4, task.num_patches, generator=g)
    weighted, _, _ = task.forward_loss(x, noise, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    alone, _, _ = task.forward_loss(x[1:3], noise[1:3])
    torch.testing.assert_close(weighted, alone)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts device-to-host reads: `.item()`, `bool()`, `float()` and `.tolist()` of a tensor all end in
    aten._local_scalar_dense, the call that synchronises a GPU."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            import traceback

            self.ops.append("".join(traceback.format_stack(limit=6)[:-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path,precision", [(TINY_SUP, "fp32"), (TINY_MAE, "bf16")])
def test_no_host_read_between_logging_steps(shards, tmp_path, path, precision):
    """ZeRO 0 with grad clipping and accumulation: the steps between two logging steps read nothing back
    from the device (the non-finite skip, its count and the stop vote stay off the host)."""
    import threading

    from pretrain import dist as pdist
    from pretrain.engine.trainer import Trainer

    cfg = _cfg(path, shards, tmp_path, "deepspeed.zero_stage=0", f"deepspeed.precision={precision}",
               "optim.grad_clip=1.0", "optim.accum_steps=2", "optim.max_steps=10", "logging.every_steps=5",
               "checkpoint.every_steps=0")
    trainer = Trainer(cfg, pdist.setup(), threading.Event())
    trainer.train_steps(1)  # the first step creates the optimizer's state
    with _HostReads() as reads:
        trainer.train_steps(3)  # steps 2-4: none a logging step
    trainer.log.close()
    assert not reads.ops, f"{len(reads.ops)} host reads in 3 steps, the first from:\n{reads.ops[0]}"


class _Collectives(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the c10d collectives dispatched (all_reduce and the others go through torch.ops.c10d)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path,precision", [(TINY_SUP, "fp32"), (TINY_MAE, "bf16")])
def test_one_rank_at_zero_0_reduces_no_gradients(shards, tmp_path, path, precision):
    """World size 1, ZeRO 0: no step all-reduces its gradients with itself (DeepSpeed's fallback would flatten
    them, reduce and copy them back), and the steps' weights equal those of an engine that does."""
    import threading

    from pretrain import dist as pdist
    from pretrain.engine.trainer import Trainer

    weights = []
    for reduce in (False, True):
        cfg = _cfg(path, shards, tmp_path, "deepspeed.zero_stage=0", f"deepspeed.precision={precision}",
                   "optim.accum_steps=2", "optim.max_steps=10", "logging.every_steps=5", "checkpoint.every_steps=0",
                   f"run.name=reduce{reduce}")
        trainer = Trainer(cfg, pdist.setup(), threading.Event())
        assert trainer.engine.enable_backward_allreduce is False
        trainer.engine.enable_backward_allreduce = reduce  # what DeepSpeed does by default
        with _Collectives() as collectives:
            trainer.train_steps(3)  # none a logging step
        trainer.log.close()
        assert bool(collectives.ops) == reduce, collectives.ops
        weights.append([p.detach().clone() for p in trainer.module.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
