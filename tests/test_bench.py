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
