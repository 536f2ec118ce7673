"""The benchmark harness runs end to end and reports a ratio (speed itself is never asserted here)."""
import json

import pytest
import torch


@pytest.mark.slow
def test_bench_step_and_mae_report_ratios(cli, tmp_path):
    out = tmp_path / "bench.json"
    r = cli("bench", "step", "mae", "--quick", "--json", str(out),
            "--step-arch", "vit_nano_patch4_16", "--step-img-size", "16", "--step-batch", "8", "--step-steps", "2",
            "--mae-arch", "vit_micro_patch4_32", "--mae-img-size", "32", "--mae-steps", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"step", "mae"}
    for row in rows.values():
        assert row["ours"] > 0 and row["baseline"] > 0
        assert row["ratio"] == pytest.approx(row["ours"] / row["baseline"] if row["name"] == "step"
                                             else row["baseline"] / row["ours"])
    assert rows["mae"]["flop_ratio"] > 0
    assert "step" in r.stdout and "ratio" in r.stdout  # the printed table


def test_bench_rejects_unknown(cli, tmp_path):
    r = cli("bench", "nosuch", "--json", str(tmp_path / "b.json"))
    assert r.returncode == 2 and "nosuch" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_bench_gpu_refuses_without_cuda(cli, tmp_path):
    r = cli("bench", "gpu", "--json", str(tmp_path / "b.json"))
    assert r.returncode == 2 and "CUDA" in r.stderr


def test_bench_names_the_extra_of_a_missing_module(monkeypatch, tmp_path):
    """A benchmark that lacks an optional module ends in one line naming the extra that installs it."""
    import argparse

    import pretrain.bench as bench
    from pretrain.errors import UserError

    class Lacking:
        def run(self, args):
            raise ModuleNotFoundError("No module named 'skimage'", name="skimage")

    monkeypatch.setattr(bench, "_module", lambda name: Lacking())
    args = argparse.Namespace(names=["loader"], json=str(tmp_path / "b.json"), quick=True)
    with pytest.raises(UserError, match=r"^bench loader needs skimage, which is not installed: "
                                        r"pip install 'vit-pretrain\[dev\]'$"):
        bench.run(args)


def test_bench_gpu_dry_run_rows_compare_like_with_like(cli, tmp_path):
    """`bench gpu --gpu-dry-run` (a tiny model on the CPU) writes one row per variant, each ratio against its
    baseline measured in the same group: ours with the timm loop, MAE with ours supervised."""
    out = tmp_path / "gpu.json"
    r = cli("bench", "gpu", "--gpu-dry-run", "--gpu-variants", "mae,timm,ours", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"timm", "ours", "mae"}
    keys = {"name", "arch", "batch", "ours", "baseline", "baseline_variant", "unit", "ratio", "mfu", "mfu_ratio",
            "flop_ratio", "flops_per_image", "warmup_s", "device", "goal", "met"}
    for row in rows.values():
        assert keys <= set(row) and row["ours"] > 0 and row["unit"] == "img/s"
    assert rows["timm"]["baseline_variant"] is None
    for variant, base in {"ours": "timm", "mae": "ours"}.items():
        row = rows[variant]
        assert row["baseline_variant"] == base and row["baseline"] == rows[base]["ours"]
        assert row["ratio"] == pytest.approx(row["ours"] / rows[base]["ours"])
        assert row["mfu_ratio"] == pytest.approx(row["ratio"] * row["flops_per_image"] / rows[base]["flops_per_image"])
    assert rows["mae"]["met"] == (rows["mae"]["ratio"] >= 1.6)


def test_bench_gpu_pairs_and_groups():
    """Compiled variants compare with compiled ones, attention backends with ours; eager and compiled variants
    are timed in separate groups, in the order they were named."""
    import argparse

    from pretrain.bench import gpu

    args = argparse.Namespace(gpu_variants="ours_compiled,timm,ours,timm_compiled,mae_compiled", gpu_attention="flash")
    names = gpu.variants(args)
    assert names == ["ours_compiled", "timm", "ours", "timm_compiled", "mae_compiled", "ours@flash",
                     "ours_compiled@flash"]
    assert gpu.groups(names) == [["ours_compiled", "timm_compiled", "mae_compiled", "ours_compiled@flash"],
                                 ["timm", "ours", "ours@flash"]]
    measured = {"timm_compiled": (100.0, 3.0, 0, []), "ours_compiled": (120.0, 3.0, 0, []),
                "mae_compiled": (180.0, 1.5, 0, []), "ours_compiled@flash": (130.0, 3.0, 0, [])}
    rows = {r["variant"]: r for r in gpu.rows_of(measured, "vit_base_patch16_224", 256, 1000.0, {})}
    assert rows["ours_compiled"]["ratio"] == pytest.approx(1.2) and rows["ours_compiled"]["mfu"] == pytest.approx(0.36)
    assert rows["ours_compiled"]["met"] is False  # 36% MFU < 40%
    assert rows["mae_compiled"]["baseline_variant"] == "ours_compiled"
    assert rows["mae_compiled"]["ratio"] == pytest.approx(1.5)
    assert rows["mae_compiled"]["mfu_ratio"] == pytest.approx(0.75)
    assert rows["mae_compiled"]["met"] is False and rows["mae_compiled"]["flop_ratio"] == pytest.approx(2.0)
    assert rows["ours_compiled@flash"]["ratio"] == pytest.approx(130 / 120)
    with pytest.raises(Exception, match="unknown variant 'nosuch'"):
        gpu.variants(argparse.Namespace(gpu_variants="nosuch", gpu_attention=""))


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                                        ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA A10", 125e12), ("Some GPU", None)])
def test_peak_flops_by_full_name(name, peak):
    """PCIe and NVL parts do not take the SXM figure: the most specific name matches first."""
    from pretrain.engine.metrics import peak_flops_of

    assert peak_flops_of(name) == peak
