"""The input path's side stream, compiled blocks and SDPA backends on a GPU (`pytest -m gpu`; the CPU half of
each is in test_kernels.py). Compile stays off except in the one test that checks it (the GPU minutes are few)."""
import json
import threading

import pytest
import torch

from conftest import metrics_rows
from pretrain.config import load_config
from pretrain.errors import UserError

from test_gpu import CONFIGS, pytestmark, shards  # noqa: F401  the gpu marks and the shards fixture


def _cfg(kind, shards, out, *extra):
    return load_config(CONFIGS[kind], [f"data.train_urls={shards}/train.json", f"run.out_dir={out}", "data.workers=2",
                                       "checkpoint.every_steps=0", "checkpoint.resume=never", "logging.every_steps=1",
                                       *extra])


def _trainer(cfg):
    from pretrain import dist as pdist
    from pretrain.engine.trainer import Trainer

    return Trainer(cfg, pdist.setup(), threading.Event())


def test_side_stream_stages_without_host_sync_and_trains_like_the_synchronous_path(shards, tmp_path, monkeypatch):
    """The staged batches arrive through the side stream (an event per batch, no host sync) and the losses are
    bit-identical to staging on the compute stream."""
    from pretrain.engine import prefetch

    extra = ["optim.max_steps=6", "deepspeed.precision=bf16", "task.mixup_alpha=0.8", "optim.accum_steps=2"]
    side = _trainer(_cfg("supervised", shards, tmp_path, "run.name=side", *extra))
    assert side.stream._side is not None
    side.fit()
    staged = []
    real_stage = prefetch.Prefetcher._stage_next

    def watched(self, batches):
        out = real_stage(self, batches)
        staged.append(out[2])
        return out

    monkeypatch.setattr(prefetch.Prefetcher, "_stage_next", watched)
    sync = _trainer(_cfg("supervised", shards, tmp_path, "run.name=sync", *extra))
    sync.stream._side = None  # staged on the compute stream, as before the side stream
    sync.fit()
    assert staged and all(e is None for e in staged)
    a, b = metrics_rows(tmp_path / "side"), metrics_rows(tmp_path / "sync")
    assert [a[s]["loss"] for s in sorted(a)] == [b[s]["loss"] for s in sorted(b)]


def test_prefetcher_issues_no_host_sync_and_overlaps():
    """Staging the next batch enqueues only device work (sync debug mode 'error') on a side stream that does not
    wait for the compute stream: it finishes while a long matmul still occupies the compute stream."""
    from pretrain.data import normalize
    from pretrain.engine.prefetch import Prefetcher

    dev = torch.device("cuda")
    mean, std = [0.5] * 3, [0.25] * 3
    host = [torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8).pin_memory() for _ in range(4)]

    class Positions:
        def state_dict(self):
            return {}

        def bad_counts(self):
            return {}

        def source_counts(self):
            return {}

    p = Prefetcher(Positions(), lambda x: (normalize(x.to(dev, non_blocking=True), mean, std),), dev)
    it = p.iterate(((0, (x,)) for x in host), wanted=lambda: 4)
    _, (x0,) = next(it)  # batch 0 handed out, batch 1 staged (the first call also builds normalize's constants)
    a = torch.randn(8192, 8192, device=dev)
    torch.cuda.synchronize()
    for _ in range(8):
        a = a @ a / 8192  # ~1/4 s of work queued on the compute stream
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, (x1,) = next(it)  # batch 2 staged on the side stream now, behind nothing of the compute stream's
    finally:
        torch.cuda.set_sync_debug_mode(0)
    p._side.synchronize()
    assert not torch.cuda.current_stream().query()  # the compute stream is still busy: the staging overlapped
    torch.cuda.synchronize()
    for i, x in enumerate((x0, x1)):
        assert torch.equal(x, normalize(host[i].to(dev), mean, std))
    it.close()


def test_sdpa_backend_is_named_in_the_log_and_pinned_ones_train(shards, tmp_path, capfd):
    t = _trainer(_cfg("mae", shards, tmp_path, "run.name=auto", "optim.max_steps=2", "deepspeed.precision=bf16"))
    t.fit()
    err = capfd.readouterr().err
    line = next(l for l in err.splitlines() if l.startswith("attention: SDPA backend "))
    names = dict(kv.split("=") for kv in line.split(" (")[0].removeprefix("attention: SDPA backend ").split())
    assert set(names) == {"encoder", "decoder_blocks"} and set(names.values()) <= {"flash", "efficient", "cudnn"}
    derived = json.loads((tmp_path / "auto" / "derived.json").read_text())
    assert derived["attention"] == line.split(" (")[0].removeprefix("attention: SDPA backend ")
    for backend in ("flash", "efficient"):
        t = _trainer(_cfg("supervised", shards, tmp_path, f"run.name={backend}", "optim.max_steps=2",
                          "deepspeed.precision=bf16", f"model.attention_backend={backend}"))
        assert json.loads((tmp_path / backend / "derived.json").read_text())["attention"] == f"encoder={backend}"
        t.fit()
    with pytest.raises(UserError, match="model.attention_backend: got 'flash'"):  # flash has no fp32 kernel
        _trainer(_cfg("supervised", shards, tmp_path, "run.name=fp32", "deepspeed.precision=fp32",
                      "model.attention_backend=flash"))


def test_compile_auto_on_cuda_warms_up_caches_and_eval_adds_no_graphs(shards, tmp_path, capfd, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    counters.clear()
    cfg = _cfg("supervised", shards, tmp_path, "run.name=c", "model.compile=auto", "deepspeed.zero_stage=2",
               "deepspeed.precision=bf16", "optim.max_steps=6", f"data.val_urls={shards}/val.json")
    t = _trainer(cfg)
    assert t.compiled and t.derived["compile"] is True
    t.train_steps(3)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    t.monitors.evaluate(3)
    t.monitors.pictures(3, t.fixed_images)
    t.train_steps(3)
    assert counters["stats"]["unique_graphs"] == graphs
    t.log.close()
    err = capfd.readouterr().err
    assert "model.compile: compile warm-up: first steps took " in err
    assert (tmp_path / "c" / "compile_cache" / "inductor").is_dir()
    torch._dynamo.reset()
