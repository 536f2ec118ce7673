"""The kernels the step runs and its input path, on the CPU: model.compile resolved, its cache, compiled blocks
run eagerly outside training (dynamo's counters), the SDPA backend pinned and checked, the warm-up said once,
and the prefetcher handing out the same batches at the same stream positions as reading them one by one."""
import json
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.data import normalize
from pretrain.engine import kernels
from pretrain.engine.prefetch import Prefetcher
from pretrain.errors import UserError

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- model.compile
def test_compile_takes_auto_and_refuses_true_at_zero_3():
    assert load_config(None, []).model.compile is False  # the default until measured on a GPU
    assert load_config(None, ["model.compile=auto", "deepspeed.zero_stage=3"]).model.compile == "auto"
    with pytest.raises(UserError, match="config key model.compile: .*needs deepspeed.zero_stage <= 2"):
        load_config(None, ["model.compile=true", "deepspeed.zero_stage=3"])
    with pytest.raises(UserError, match="config key model.compile: got 'sometimes'"):
        load_config(None, ["model.compile=sometimes"])


def test_compile_auto_resolves_per_device_and_stage():
    said = []
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert kernels.resolve_compile("auto", cuda, 2) is True
    assert kernels.resolve_compile("auto", cpu, 0) is False
    assert kernels.resolve_compile("auto", cuda, 3, said.append) is False
    assert said == ["model.compile=auto: off at deepspeed.zero_stage=3 (compiled blocks need ZeRO stage 2 or lower)"]
    assert kernels.resolve_compile(True, cpu, 0) is True and kernels.resolve_compile(False, cuda, 0) is False


def test_compile_cache_goes_into_a_local_run_dir_unless_set(tmp_path):
    env = {"TRITON_CACHE_DIR": "/mine"}
    got = kernels.compile_cache_env(str(tmp_path / "run"), env)
    assert got == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "run" / "compile_cache" / "inductor")}
    assert env["TRITON_CACHE_DIR"] == "/mine"  # the user's setting stays
    assert kernels.compile_cache_env("memory://bucket/run", {}) == {}  # an object store has no paths for it


def _tiny_task():
    from pretrain.tasks import build_task

    cfg = load_config(str(REPO / "configs/pretrain/supervised_tiny_cpu.yaml"), [])
    return build_task(cfg, 10, None)


def test_eval_runs_compiled_blocks_eagerly_without_new_graphs():
    """What Monitors does outside training (eval mode, no_grad, another batch size) under kernels.eager adds
    no graph to the training ones; without it dynamo would compile new ones."""
    from torch._dynamo.utils import counters

    from pretrain.engine.ds import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    task = _tiny_task()
    compile_blocks(task, backend="eager")
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    task.train()
    task(x, y, 0)[0].backward()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    task.eval()
    with kernels.eager(), torch.no_grad():
        task.encoder(torch.randn(3, 3, 16, 16))
    assert counters["stats"]["unique_graphs"] == graphs
    task.train()
    task(x, y, 1)[0].backward()
    assert counters["stats"]["unique_graphs"] == graphs  # training's graphs still serve
    task.eval()
    with torch.no_grad():
        task.encoder(torch.randn(3, 3, 16, 16))
    assert counters["stats"]["unique_graphs"] > graphs  # the control: this is what eager() prevents
    torch._dynamo.reset()


def test_warmup_clock_says_the_first_steps_once():
    said = []
    clock = kernels.WarmupClock(accum=2, start_step=5, say=said.append)
    for i in range(10, 20):
        clock.micro(i)
    assert len(said) == 1 and said[0].startswith("model.compile: compile warm-up: first steps took ")
    assert said[0].count(" s,") == 1
    quiet = kernels.WarmupClock(accum=1, start_step=0, say=None)
    quiet.micro(0)


# ------------------------------------------------------------------------------------------- attention
def test_attention_backend_values():
    assert load_config(None, []).model.attention_backend == "auto"
    for b in ("flash", "cudnn", "efficient", "math"):
        assert load_config(None, [f"model.attention_backend={b}"]).model.attention_backend == b
    with pytest.raises(UserError, match="config key model.attention_backend: got 'fast'"):
        load_config(None, ["model.attention_backend=fast"])


def test_attention_shapes_of_encoder_and_mae_decoder():
    from pretrain.models import resolve_arch
    from pretrain.tasks import build_task

    cfg = load_config(str(REPO / "configs/pretrain/mae_tiny_cpu.yaml"), [])
    shapes = kernels.attention_shapes(build_task(cfg, 0, None))
    assert set(shapes) == {"encoder", "decoder_blocks"}
    heads, tokens, dim = shapes["encoder"]
    arch = resolve_arch(cfg.model)
    assert (heads, tokens, dim) == (arch["num_heads"], (arch["img_size"] // arch["patch_size"]) ** 2 + 1,
                                    arch["embed_dim"] // arch["num_heads"])
    assert shapes["decoder_blocks"] == (2, tokens, 16)  # 32 wide, 2 heads


def test_pinned_backend_the_cpu_cannot_run_is_refused_naming_the_option():
    task = _tiny_task()
    cpu = torch.device("cpu")
    assert set(kernels.check_attention("math", task, torch.float32, cpu).values()) == {"math"}
    for b in ("efficient", "cudnn"):
        with pytest.raises(UserError, match=f"config key model.attention_backend: got '{b}', which cannot run"):
            kernels.check_attention(b, task, torch.float32, cpu)


def test_pinned_backend_holds_inside_the_forward_only():
    task = _tiny_task()
    kernels.pin_attention(task, "math")
    seen = []
    task.encoder.blocks[0].attn.register_forward_hook(
        lambda *a: seen.append((torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())))
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    task(x, y, 0)
    assert seen == [(True, False)]
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the forward
    with pytest.raises(Exception):
        task(torch.randn(2, 5, 16, 16), y, 0)  # a failing forward restores it too
    assert torch.backends.cuda.flash_sdp_enabled()


# ------------------------------------------------------------------------------------------- prefetch
class _Stream:
    """Batches 0..n-1 of uint8 noise; its state is how many it has yielded."""

    def __init__(self, n=5):
        g = torch.Generator().manual_seed(0)
        self.data = [torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=g) for _ in range(n)]
        self.read, self.num_samples = 0, 2 * n

    def iter_epoch_weighted(self, epoch):
        for x in self.data:
            self.read += 1
            yield x, torch.zeros(2, dtype=torch.long), None, None

    def state_dict(self):
        return {"read": self.read}

    def bad_counts(self):
        return {"bad": self.read}

    def source_counts(self):
        return {}


def test_prefetcher_hands_out_the_same_batches_at_the_same_positions():
    mean, std = [0.5] * 3, [0.25] * 3
    stream = Prefetcher(_Stream(), lambda x, y, w, r: (normalize(x, mean, std), y), torch.device("cpu"))
    assert stream.num_samples == 10  # the rest of the stream interface passes through

    def batches():
        for b in stream.inner.iter_epoch_weighted(0):
            yield 0, b

    got = []
    for i, (epoch, (x, y)) in enumerate(stream.iterate(batches(), wanted=lambda: 4)):
        assert torch.equal(x, normalize(stream.inner.data[i], mean, std))
        # the stream has read one ahead (while more are wanted); the position reported is the trained one
        got.append((stream.inner.read, stream.state_dict()["read"], stream.bad_counts()["bad"]))
        if i == 4:
            break
    assert got == [(2, 1, 1), (3, 2, 2), (4, 3, 3), (4, 4, 4), (5, 5, 5)]  # nothing read past the 4 wanted


def test_cpu_run_logs_resolved_kernels(tmp_path):
    from pretrain.data.writer import write_shards
    from pretrain.engine.trainer import train

    write_shards("synthetic:80", str(tmp_path / "shards"), samples_per_shard=40, val_fraction=0.0)
    over = [f"data.train_urls={tmp_path}/shards/train.json", f"run.out_dir={tmp_path}", "optim.max_steps=2",
            "checkpoint.every_steps=0", "model.compile=auto", "model.attention_backend=math"]
    cfg = load_config(str(REPO / "configs/pretrain/supervised_tiny_cpu.yaml"), over)
    train(cfg)
    derived = json.loads((tmp_path / "supervised_tiny_cpu" / "derived.json").read_text())
    assert derived["compile"] is False and derived["attention"] == "encoder=math"
    with pytest.raises(UserError, match="model.attention_backend: got 'efficient'"):
        train(load_config(str(REPO / "configs/pretrain/supervised_tiny_cpu.yaml"),
                          [*over, "model.attention_backend=efficient", "run.name=eff"]))
