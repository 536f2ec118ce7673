"""data.decode=gpu on a GPU (`pytest -m gpu`): nvJPEG's batches against the CPU path's, and exact resume after
`kill -9`. Skipped with the reason where no CUDA device is visible; the split itself is tested on the CPU in
tests/test_data_decode.py."""
import sys

import pytest
import torch

from conftest import metrics_rows, run_cli
from test_data_decode import TINY_MAE, _epoch, _mean_abs, _stream, shards, synthetic  # noqa: F401  fixtures
from test_gpu import pytestmark  # noqa: F401  the gpu marks
from test_resume_matrix import _kill9_at


@pytest.mark.parametrize("augment", ["mae", "train"])
def test_nvjpeg_batches_match_the_cpu_paths(shards, augment):
    cpu, gpu = _epoch(_stream(shards, augment)), _epoch(_stream(shards, augment, torch.device("cuda", 0)))
    assert [y.tolist() for _, y in gpu] == [y.tolist() for _, y in cpu]  # the same samples, in the same order
    for (xc, _), (xg, _) in zip(cpu, gpu):
        assert xg.device.type == "cuda" and xg.dtype == torch.uint8 and xg.shape == xc.shape
        assert _mean_abs(xg.cpu(), xc) < 2.0
        for a, b in zip(xg.cpu(), xc):
            assert _mean_abs(a, b) < 4.0  # every sample: its crop and its flip


def test_kill9_resume_with_gpu_decode_is_exact(synthetic, tmp_path):
    args = ["train", TINY_MAE, f"data.train_urls={synthetic}/train.json", f"run.out_dir={tmp_path}",
            "data.decode=gpu", "optim.max_steps=10", "checkpoint.every_steps=3", "checkpoint.keep=10",
            "logging.every_steps=1"]
    whole = run_cli(*args, "run.name=whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = [*args, "run.name=cut"]
    _kill9_at([sys.executable, "-m", "pretrain", *cut], tmp_path / "cut", 5)
    again = run_cli(*cut)
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr[-3000:]
    a, b = metrics_rows(tmp_path / "whole"), metrics_rows(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for s in a:  # the same samples and crops; CUDA's atomic adds reorder sums: equal up to rounding
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-3), s
