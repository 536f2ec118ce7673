"""The GPU path's logic, run on the CPU: device selection per launcher, optimizer choice, half-precision
masks, losses, pictures and k-NN, the DeepSpeed config's syncs, the stop-check cadence, DeepSpeed's bf16
mode and per-block compilation. What only a GPU can show is in test_gpu.py."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, metrics_rows, run_job
from pretrain.config import load_config
from pretrain.dist import device_index, resolve
from pretrain.engine.ds import Precision, build_ds_config, build_optimizer, compile_blocks, resolve_precision
from pretrain.errors import UserError

from test_engine import TINY_MAE, TINY_SUP, _cfg, shards  # noqa: F401  (shards: the same module fixture)


# ------------------------------------------------------------------------------- 1. device selection

SLURM = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "0", "SLURM_PROCID": "11",
         "SLURM_LOCALID": "3", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
         "SLURM_STEP_NODELIST": "gpu[01-02]", "MASTER_ADDR": "gpu01"}
TORCHRUN = {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1",
            "MASTER_ADDR": "gpu01", "MASTER_PORT": "29600", "TORCHELASTIC_RUN_ID": "x"}
DEEPSPEED = {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_SIZE": "8", "CROSS_RANK": "1",
             "CROSS_SIZE": "2", "MASTER_ADDR": "gpu01", "MASTER_PORT": "29500"}


def _visible(env: dict, node_gpus: int = 8) -> int:
    """What torch.cuda.device_count() reports under `env` on a node of `node_gpus` GPUs."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    return node_gpus if cvd is None else len([d for d in cvd.split(",") if d])


@pytest.mark.parametrize("env,expected", [
    (TORCHRUN, 3),                                                       # all 8 GPUs visible
    (DEEPSPEED, 3),
    (dict(DEEPSPEED, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), 3),        # the launcher's --include
    (SLURM, 3),                                                          # srun --gpus-per-node=8, no binding
    (dict(SLURM, CUDA_VISIBLE_DEVICES="3"), 0),                          # srun --gpus-per-task=1 / --gpu-bind
    (dict(TORCHRUN, CUDA_VISIBLE_DEVICES="5"), 0),                       # one GPU handed to each worker
    ({}, 0),                                                             # one process
])
def test_device_index_per_launcher(env, expected):
    assert device_index(resolve(env).local_rank, _visible(env)) == expected


def test_device_index_refuses_sharing_and_no_gpu():
    env = dict(SLURM, CUDA_VISIBLE_DEVICES="0,1")  # 8 tasks per node, 2 GPUs each would share
    with pytest.raises(UserError, match=r"local rank 3 has no GPU of its own: 2 GPUs are visible.*per node"):
        device_index(resolve(env).local_rank, 2)
    with pytest.raises(UserError, match="no CUDA device is visible"):
        device_index(0, 0)


# ------------------------------------------------------------------------------- 2. optimizer

def _groups():
    return [{"params": [torch.nn.Parameter(torch.randn(4, 4))], "lr_scale": 1.0}]


def test_optimizer_is_torch_adamw_fused_on_cuda_without_deepspeed_ops():
    cfg = load_config(None, ["deepspeed.zero_stage=2"])
    # the CUDA branch, taken with CPU tensors (torch's fused AdamW runs on the CPU too): no FusedAdam, no build
    opt = build_optimizer(cfg, _groups(), torch.device("cuda"))
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    stage0 = build_optimizer(load_config(None, ["deepspeed.zero_stage=0"]), _groups(), torch.device("cuda"))
    assert isinstance(stage0, torch.optim.AdamW) and stage0.defaults["fused"] and hasattr(stage0, "overflow")
    cpu = build_optimizer(cfg, _groups(), torch.device("cpu"))
    assert type(cpu) is torch.optim.AdamW and not cpu.defaults["fused"]
    # a plain loop's optimizer (the benchmarks' baseline) at stage 0: the same fused kernel as ours, unguarded
    plain = build_optimizer(load_config(None, ["deepspeed.zero_stage=0"]), _groups(), torch.device("cpu"), guard=False)
    assert type(plain) is torch.optim.AdamW and plain.defaults["fused"]


def test_optim_impl_is_checked():
    assert load_config(None, ["optim.impl=deepspeed"]).optim.impl == "deepspeed"
    with pytest.raises(UserError, match="config key optim.impl: got 'apex'"):
        load_config(None, ["optim.impl=apex"])


# ------------------------------------------------------------------------------- 3. fp16 / bf16

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mae_mask_and_loss_stay_fp32_in_half_precision(dtype):
    """72,000 hidden patches (6,000 images of 16 patches): as a half-precision sum that overflows fp16
    (max 65,504) and rounds in bf16 (to a multiple of 512); mask and loss must match float64."""
    from pretrain.models import create_model
    from pretrain.models.mae import MaskedAutoencoder, patchify, random_masking

    b, n = 6000, 16
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(b, n, 8, generator=g).to(dtype)
    _, mask, _ = random_masking(tokens, 0.75, torch.rand(b, n, generator=g))
    assert mask.dtype == torch.float32 and mask.sum().item() == 72_000
    mae = MaskedAutoencoder(create_model("vit_nano_patch4_16", num_classes=0), decoder_embed_dim=16,
                            decoder_depth=1, decoder_num_heads=2)
    imgs = torch.randn(b, 3, 16, 16, generator=g).to(dtype)
    pred = torch.randn(b, n, 48, generator=g).to(dtype)
    loss = mae.loss(imgs, pred, mask)
    target = patchify(imgs.double(), 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    ref = (((pred.double() - target) ** 2).mean(-1) * mask.double()).sum() / mask.double().sum()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref.item(), rel=1e-4)
    # a mask handed over in half precision (0/1 exactly) gives the same loss: the reduction is fp32
    assert mae.loss(imgs, pred, mask.to(dtype)).item() == pytest.approx(loss.item(), rel=1e-6)


def test_precision_auto_and_bf16_modes():
    cpu = torch.device("cpu")
    assert resolve_precision(load_config(None, []).deepspeed, cpu).name == "fp32"
    autocast = resolve_precision(load_config(None, ["deepspeed.precision=bf16"]).deepspeed, cpu)
    assert (autocast.autocast, autocast.input_dtype, autocast.engine_bf16) == (torch.bfloat16, torch.float32, False)
    engine = resolve_precision(load_config(None, ["deepspeed.precision=bf16", "deepspeed.bf16_mode=deepspeed"]
                                           ).deepspeed, cpu)
    assert (engine.input_dtype, engine.engine_bf16) == (torch.bfloat16, True)
    cfg = load_config(None, [])
    assert build_ds_config(cfg, 1, engine)["bf16"] == {"enabled": True}
    assert build_ds_config(cfg, 1, autocast)["bf16"] == {"enabled": False}


def test_weight_ema_refuses_a_half_precision_module(shards, tmp_path):
    from pretrain.engine.trainer import train

    cfg = _cfg(TINY_SUP, shards, tmp_path, "task.kind=finetune", f"finetune.init_from={tmp_path}/enc.safetensors",
               "finetune.ema_decay=0.999", "deepspeed.precision=bf16", "deepspeed.bf16_mode=deepspeed")
    with pytest.raises(UserError, match="config key finetune.ema_decay: a weight EMA needs fp32 weights.*bfloat16"):
        train(cfg)


# ------------------------------------------------------------------------------- 4. per-step syncs

def test_deepspeed_throughput_timer_is_off():
    from deepspeed.utils.config import get_timers_config

    ds = build_ds_config(load_config(None, []), 2, Precision("fp32", None, torch.float32))
    assert get_timers_config(ds).enabled is False  # as DeepSpeed's engine reads it
    assert get_timers_config({}).enabled is True  # DeepSpeed's default, which syncs twice per micro-step


def test_normalize_keeps_its_constants_on_the_device():
    from pretrain.data import normalize
    from pretrain.data.transforms import _affine

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    first = _affine(tuple(mean), tuple(std), x.device)
    out = normalize(x, mean, std)
    assert _affine(tuple(mean), tuple(std), x.device) is first  # made once, reused every step
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------------------- 7. torch.compile

def test_compile_blocks_compiles_each_trained_block_and_keeps_names():
    """Per-block compilation (the compiled steps themselves run in test_gpu.py: inductor on this CPU
    takes about a minute)."""
    from pretrain.tasks import build_task

    mae = build_task(load_config(TINY_MAE, ["mae.decoder_depth=2"]), 0)
    keys = list(mae.state_dict())
    depth = len(mae.encoder.blocks)
    assert compile_blocks(mae) == [f"encoder.blocks.{i}" for i in range(depth)] + ["decoder_blocks.0",
                                                                                   "decoder_blocks.1"]
    assert list(mae.state_dict()) == keys  # checkpoints and export see the same names
    assert all(b._compiled_call_impl is not None for b in [*mae.encoder.blocks, *mae.decoder_blocks])
    assert mae.decoder_embed._compiled_call_impl is None  # what lies between blocks stays eager


def test_compile_needs_zero_stage_2_or_lower():
    assert load_config(None, ["model.compile=true", "deepspeed.zero_stage=2"]).model.compile
    with pytest.raises(UserError, match="config key model.compile: .*needs deepspeed.zero_stage <= 2"):
        load_config(None, ["model.compile=true", "deepspeed.zero_stage=3"])


def stop_worker(config: str, stop_at: int, overrides: list[str]) -> None:
    """torchrun worker: rank 0 alone gets the stop signal before step `stop_at + 1`; writes its result."""
    import threading

    from pretrain import dist as pdist
    from pretrain.engine.trainer import Trainer

    class SignalledOnRank0(Trainer):
        def _iteration(self):
            if self.rank == 0 and self.step == stop_at:
                self.stop.set()
            return super()._iteration()

    env = pdist.setup()
    trainer = SignalledOnRank0(load_config(config, overrides), env, threading.Event())
    result = trainer.fit()
    Path(trainer.run_dir, f"result_rank{env.rank}.json").write_text(json.dumps(
        {"step": result["step"], "stopped_early": result["stopped_early"]}))
    pdist.teardown()


@pytest.mark.slow
def test_stop_signal_on_one_rank_is_honoured_by_all_at_the_next_check(shards, tmp_path):
    """run.stop_check_steps=4: a signal seen by rank 0 during step 6 enters the vote started after step 8,
    answered after step 12: both ranks stop there, with a checkpoint of step 12."""
    overrides = [f"data.train_urls={shards}/train.json", f"run.out_dir={tmp_path}", "run.name=stop",
                 "optim.max_steps=16", "checkpoint.every_steps=0", "run.stop_check_steps=4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), __file__, TINY_SUP, "5", *overrides]
    proc = run_job(cmd, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "stop"
    for rank in (0, 1):
        assert json.loads((run / f"result_rank{rank}.json").read_text()) == {"step": 12, "stopped_early": True}
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000012"
    assert max(metrics_rows(run)) == 12


# ------------------------------------------------------------------------------- 3 + 6. half-precision runs

@pytest.mark.slow
@pytest.mark.parametrize("path,stage", [(TINY_MAE, 0), (TINY_SUP, 1), (TINY_MAE, 2), (TINY_MAE, 3)])
def test_deepspeed_bf16_mode_trains_with_pictures_and_knn(shards, tmp_path, path, stage):
    """DeepSpeed's bf16 mode holds the module in bf16: the training step, the pictures and the k-NN
    monitor must all feed it bf16, and its losses must track the autocast mode's (same init, same data)."""
    from pretrain.engine.trainer import train

    common = ["optim.max_steps=4", "checkpoint.every_steps=0", f"deepspeed.zero_stage={stage}",
              "deepspeed.precision=bf16", "logging.images_every_steps=2", "eval.knn_every_steps=2",
              f"eval.knn_train_urls={shards}/train.json", f"eval.knn_val_urls={shards}/val.json"]
    runs = {}
    for mode in ("autocast", "deepspeed"):
        runs[mode] = train(_cfg(path, shards, tmp_path, f"run.name={mode}", f"deepspeed.bf16_mode={mode}", *common))
    ours = metrics_rows(runs["deepspeed"]["run_dir"])
    ref = metrics_rows(runs["autocast"]["run_dir"])
    assert sorted(ours) == [1, 2, 3, 4] and runs["deepspeed"]["skipped_steps"] == 0
    for s in ours:  # bf16 weights round the updates: close, not equal
        assert ours[s]["loss"] == pytest.approx(ref[s]["loss"], rel=0.05), s
    ck = Path(runs["deepspeed"]["run_dir"]) / "checkpoints/step_00000004"
    if stage < 3:  # really DeepSpeed's bf16 mode: the module it saved is bf16
        module = torch.load(ck / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert module["encoder.blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    else:  # ZeRO-3 saves no whole module; DeepSpeed names its bf16-mode optimizer shards so
        assert (ck / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(Path(runs["deepspeed"]["run_dir"]) / "tb"), size_guidance={"images": 0, "scalars": 0})
    tb.Reload()
    assert [e.step for e in tb.Images("attention/last_block")] == [2, 4]
    assert [e.step for e in tb.Scalars("knn/top1")] == [2, 4]


if __name__ == "__main__":
    stop_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3:])


@pytest.mark.parametrize("mode,stage", [("autocast", 0), ("autocast", 2), ("deepspeed", 1)])
def test_bf16_modes_compute_in_bf16_inside_the_engine(tmp_path, mode, stage):
    """DeepSpeed's forward turns off an autocast entered outside it unless its `torch_autocast` section
    enables one: the bf16 modes then ran their linear layers in fp32 inside the engine (6x slower than a
    plain timm loop on an H100). The encoder's matmuls must produce bf16 (on CUDA when a GPU is there)."""
    import threading

    from pretrain import dist as pdist
    from pretrain.bench.step import MemoryStream, bench_config
    from pretrain.engine.trainer import Trainer

    x, y = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8), torch.arange(4)
    cfg = bench_config("vit_nano_patch4_16", 16, 4, stage, "supervised", str(tmp_path),
                       ["deepspeed.precision=bf16", f"deepspeed.bf16_mode={mode}"])
    trainer = Trainer(cfg, pdist.setup(), threading.Event(), stream=MemoryStream(x, y, 10))
    seen = []
    qkv = trainer.engine.module.encoder.blocks[0].attn.qkv
    qkv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    trainer.train_steps(1)
    assert seen == [torch.bfloat16]  # on the CPU an outer autocast survives DeepSpeed's forward; on CUDA only with:
    assert trainer.engine.torch_autocast_enabled() and trainer.engine.torch_autocast_dtype() == torch.bfloat16
    assert all(p.dtype == (torch.bfloat16 if mode == "deepspeed" else torch.float32)
               for p in trainer.engine.module.parameters() if p.numel())
