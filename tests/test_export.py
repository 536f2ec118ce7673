"""Export: real DeepSpeed ZeRO-2/3 checkpoints (1 and 2 processes) -> safetensors -> plain timm, strict."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pretrain  # noqa: E402,F401  (timm import fix-up)


class TinyTask(torch.nn.Module):
    """Task-shaped module: a timm ViT under `encoder`, plus (MAE-like) a decoder that export must drop."""

    def __init__(self, mae: bool):
        super().__init__()
        from pretrain.models import create_model

        self.kwargs = dict(num_classes=0 if mae else 5, global_pool="token",
                           pos_embed="sincos" if mae else "learned")
        self.encoder = create_model("vit_nano_patch4_16", **self.kwargs)
        self.decoder = torch.nn.Linear(32, 16) if mae else None

    def forward(self, x, y):
        out = self.encoder(x)
        if self.decoder is not None:
            return self.decoder(out).pow(2).mean()
        return torch.nn.functional.cross_entropy(out, y)


def make_run(run_dir: str, stage: int, mae: bool, steps: int = 3) -> None:
    """Train a TinyTask a few steps under DeepSpeed and save it in the run-dir layout; rank 0 writes the
    live model's outputs on the export's fixed input to `reference.pt`."""
    import deepspeed

    from pretrain import dist
    from pretrain.weights import fixed_input

    d = dist.setup()
    torch.manual_seed(0)
    task = TinyTask(mae)
    params = [p for p in task.parameters() if p.requires_grad]
    ds_cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=task, model_parameters=params, config=ds_cfg,
                                      optimizer=torch.optim.AdamW(params, lr=1e-2))
    g = torch.Generator().manual_seed(d.rank)
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16, generator=g)
        y = torch.randint(0, 5, (4,), generator=g)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    tag = f"step_{steps:08d}"
    engine.save_checkpoint(f"{run_dir}/checkpoints", tag=tag)
    engine.module.eval()
    meta = {"timm_kwargs": {"img_size": 16, "in_chans": 3}}
    with torch.no_grad():
        ref = engine.module.encoder(fixed_input(meta))  # every rank: ZeRO-3 gathers parameters collectively
    if d.rank == 0:
        Path(run_dir, "checkpoints", "latest").write_text(tag)
        Path(run_dir, "model.json").write_text(json.dumps(
            {"task": "mae" if mae else "supervised",
             "create_model": {"name": "vit_nano_patch4_16", **task.kwargs}, "num_classes": task.kwargs["num_classes"]}))
        torch.save(ref, f"{run_dir}/reference.pt")


def check_export(run_dir: Path, mae: bool) -> None:
    import timm
    from safetensors.torch import load_file

    from pretrain.export import export
    from pretrain.weights import fixed_input

    result = export(str(run_dir), out=str(run_dir / "out" / "model.safetensors"))
    assert result["max_abs_diff"] <= 1e-5
    meta = json.loads((run_dir / "out" / "model.json").read_text())
    assert meta["img_size"] == 16 and meta["patch_size"] == 4 and meta["global_pool"] == "token"
    assert meta["num_classes"] == (0 if mae else 5)
    state = load_file(run_dir / "out" / "model.safetensors")
    assert not any(k.startswith(("encoder.", "decoder.")) for k in state), "timm key names only"
    # what a user does, with nothing of ours: plain timm, strict
    model = timm.create_model(meta["timm_name"], pretrained=False, **meta["timm_kwargs"]).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(fixed_input(meta))
    ref = torch.load(run_dir / "reference.pt", weights_only=True)
    assert out.shape == ref.shape == ((4, 32) if mae else (4, 5))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("mae", [False, True], ids=["supervised", "mae"])
def test_export_one_process(tmp_path, stage, mae):
    make_run(str(tmp_path), stage, mae)
    check_export(tmp_path, mae)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_export_two_processes(tmp_path, stage):
    from conftest import free_port, run_job

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), __file__, str(tmp_path), str(stage)]
    proc = run_job(cmd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = tmp_path / "checkpoints" / "step_00000003"
    assert len(list(ck.glob("*optim_states.pt"))) == 2, "a 2-process ZeRO checkpoint has 2 optimizer shards"
    check_export(tmp_path, mae=False)


def test_mismatch_is_an_error():
    from pretrain.export import check_outputs, ExportMismatch
    from pretrain.models import create_model

    a = create_model("vit_nano_patch4_16", num_classes=3).eval()
    b = create_model("vit_nano_patch4_16", num_classes=3).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert check_outputs(a, b, x) == 0.0
    with torch.no_grad():
        b.head.bias.add_(1e-2)
    with pytest.raises(ExportMismatch):
        check_outputs(a, b, x)


def test_cli_user_errors(tmp_path, cli):
    p = cli("export", str(tmp_path))
    assert p.returncode == 2 and "checkpoints/latest" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000001")
    p = cli("export", str(tmp_path), "--tag", "step_00000009")
    assert p.returncode == 2 and "step_00000009" in p.stderr


def test_cli_exports(tmp_path, cli):
    make_run(str(tmp_path), 2, mae=False)
    p = cli("export", str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout)
    assert result["tag"] == "step_00000003" and result["max_abs_diff"] <= 1e-5
    assert Path(result["weights"]).is_file() and Path(result["meta"]).is_file()


if __name__ == "__main__":  # a torchrun worker of test_export_two_processes
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    make_run(sys.argv[1], int(sys.argv[2]), mae=False)


@pytest.mark.parametrize("kind", ["classifier", "mae"])
def test_hf_format(tmp_path, kind):
    transformers = pytest.importorskip("transformers")  # optional extra `hf`
    from pretrain.export import export
    from pretrain.weights import fixed_input

    mae = kind == "mae"
    make_run(str(tmp_path), 2, mae)
    result = export(str(tmp_path), out=str(tmp_path / "out" / "m.safetensors"), fmt="hf")
    cls = transformers.ViTMAEModel if mae else transformers.ViTForImageClassification
    model = cls.from_pretrained(result["hf_dir"]).eval()
    meta = {"timm_kwargs": {"img_size": 16, "in_chans": 3}}
    with torch.no_grad():
        out = model(pixel_values=fixed_input(meta))
    got = out.last_hidden_state[:, 0] if mae else out.logits
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
