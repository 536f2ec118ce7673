"""`bench memory`: the search for the largest micro-batch, its probes in processes of their own, the paper model of
per-rank memory at ZeRO 0-3 (checked against DeepSpeed's estimators) and the command end to end on the CPU."""
import argparse
import json

import pytest
import torch

from pretrain.bench import memory
from pretrain.bench import memory_model as mm
from pretrain.bench.memory import Probe, largest_fit, outcome


def threshold(limit: int, crash_at: int | None = None):
    """A probe that fits up to `limit` (peak = batch MiB, capacity = limit MiB) and crashes at `crash_at`."""
    def probe(b: int) -> Probe:
        if b == crash_at:
            return Probe(b, error="probe process exited with 1: ValueError: boom")
        return Probe(b, fits=b <= limit, peak_bytes=b * 2**20 if b <= limit else None, capacity_bytes=limit * 2**20)
    return probe


@pytest.mark.parametrize("limit, start, order", [
    (100, 1, [1, 2, 4, 8, 16, 32, 64, 128, 96]),  # doubling: floor(log2 100) + 2 probes, then one midpoint
    (100, 512, [512, 256, 128, 64, 96]),  # too large a start: halving until one fits
    (64, 8, [8, 16, 32, 64, 128, 96]),  # a limit on a power of two: the midpoint fails
    (1, 4, [4, 2, 1]),  # only batch 1 fits: nothing to refine
    (0, 2, [2, 1]),  # nothing fits
    (5000, 64, [64, 128, 256]),  # --memory-max-batch reached
])
def test_search_finds_the_limit_in_the_expected_probes(limit, start, order):
    probes = largest_fit(threshold(limit), start, max_batch=256, refine=1)
    assert [p.batch for p in probes] == order
    lo, hi = outcome(probes)
    assert lo == max(b for b in order if b <= limit) if limit else lo == 0
    assert hi is None or hi > limit
    assert memory.stopped(probes) is None


def test_search_jumps_to_the_guess_and_bisects_an_overshoot():
    """A fit's slope predicts where the limit is: the search jumps to the largest power-of-two multiple below it;
    a guess past the limit is bisected back over the powers of two."""
    exact = largest_fit(threshold(100), 4, 4096, guess=lambda p: 100)
    assert [p.batch for p in exact] == [4, 64, 128, 96]
    over = largest_fit(threshold(100), 4, 4096, guess=lambda p: 1000)
    assert [p.batch for p in over] == [4, 512, 32, 128, 64, 96]
    assert outcome(over) == (96, 128)


def test_a_crashing_probe_is_reported_not_taken_as_out_of_memory():
    probes = largest_fit(threshold(100, crash_at=16), 1, 4096)
    assert [p.batch for p in probes] == [1, 2, 4, 8, 16]
    assert outcome(probes) == (8, None)  # 16 neither fits nor fails
    assert memory.stopped(probes) == "batch 16: probe process exited with 1: ValueError: boom"


def test_out_of_memory_is_told_from_other_errors():
    assert memory.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert memory.out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not memory.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_probe_process_that_crashes_is_an_error_with_its_message():
    spec = {"arch": "no_such_arch", "kind": "supervised", "ckpt": False, "num_classes": 10, "more": [], "steps": 1,
            "limit_bytes": 2**30, "batch": 4}
    p = memory.run_probe(spec, timeout_s=120)
    assert p.fits is None and p.batch == 4
    assert "exited with" in p.error and "no_such_arch" in p.error


def test_probe_over_the_simulated_limit_does_not_fit(tmp_path):
    spec = {"arch": "vit_nano_patch4_16", "kind": "supervised", "ckpt": True, "num_classes": 10, "more": [],
            "steps": 1, "limit_bytes": 1, "batch": 2}
    out = memory.probe_main(spec)
    assert out["fits"] is False and out["oom"].startswith("simulated: peak")


def test_bench_memory_refuses_without_cuda_unless_dry_run():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    p = argparse.ArgumentParser()
    memory.add_arguments(p)
    with pytest.raises(memory.UserError, match="needs a CUDA device; --memory-dry-run"):
        next(memory.run(p.parse_args([])))


# ------------------------------------------------------------------------------------------- the paper model
def test_zero0_on_one_rank_is_the_measured_points():
    params = 86_567_656
    points = [(64, 20e9), (128, 35e9), (256, 65e9)]  # exactly linear: 5e9 + 2.34e8 per sample
    fit = mm.fit_activations(points, params)
    for b, peak in points:
        assert mm.per_rank_bytes(params, 0, 1, b, fit) == pytest.approx(peak)
    one = mm.fit_activations([(64, 20e9)], params)  # one point: static = the paper's ZeRO-0 model states
    assert one.static_bytes == 16 * params and mm.per_rank_bytes(params, 0, 1, 64, one) == pytest.approx(20e9)


@pytest.mark.parametrize("layout", list(mm.LAYOUTS))
def test_each_stage_lowers_per_rank_memory(layout):
    params, largest = mm.count_params("vit_base_patch16_224", "supervised")
    fit = mm.fit_activations([(64, 20e9), (128, 35e9)], params, layout)
    for n in (2, 4, 8, 64):
        if layout == "autocast" and n == 2:  # ZeRO 1's fp32 master and gradient copies eat what 2 ranks save
            assert mm.model_state_bytes(params, 1, 2, layout) == mm.model_state_bytes(params, 0, 2, layout)
            continue
        per_stage = [mm.per_rank_bytes(params, s, n, 128, fit, layout, largest) for s in range(4)]
        assert all(a > b for a, b in zip(per_stage, per_stage[1:])), (n, per_stage)
        fits = [mm.largest_batch(141e9, params, s, n, fit, layout, largest) for s in (0, 3)]
        assert fits[1] > fits[0]
    assert mm.model_state_bytes(params, 0, 1, "autocast") == 16 * params  # fp32 params, grads, two moments


@pytest.mark.parametrize("arch", ["vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"])
def test_model_states_match_deepspeeds_estimators(arch, capsys):
    """The `deepspeed` layout is DeepSpeed's: equal at ZeRO 2; at ZeRO 3 ours adds the bf16 parameter partition
    (2P/N) that its estimator leaves out. Tolerance: 1 byte (its int rounding)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    params, largest = mm.count_params(arch, "supervised")
    for n in (1, 8, 64):
        ours2 = mm.model_state_bytes(params, 2, n, "deepspeed")
        assert ours2 == pytest.approx(mm.deepspeed_estimate(params, 2, n), abs=1)
        ours3 = mm.model_state_bytes(params, 3, n, "deepspeed", largest)
        assert ours3 - mm.deepspeed_estimate(params, 3, n, largest) == pytest.approx(2 * params / n, abs=1)
    estimate_zero2_model_states_mem_needs_all_cold(params, num_gpus_per_node=8)  # the printed table, same figure
    assert f"{mm.model_state_bytes(params, 2, 8, 'deepspeed') / 2**30:.2f}GB" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ end to end
def test_dry_run_writes_rows_through_the_cli(cli, tmp_path):
    """`bench memory --memory-dry-run`: probes in processes of their own, the search, the paper and the JSON."""
    out = tmp_path / "memory.json"
    r = cli("bench", "memory", "--memory-dry-run", "--memory-kinds", "supervised", "--memory-ckpt", "on",
            "--memory-start", "8", "--memory-max-batch", "16", "--memory-limit-mib", "100000", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    [row] = json.loads(out.read_text())
    assert row["name"] == "memory vit_micro_patch4_32 supervised ckpt on" and row["grad_checkpointing"] is True
    assert [(p["batch"], p["fits"]) for p in row["probes"]] == [(8, True), (16, True)]
    assert row["ours"] == 16 and row["fails_at"] is None and row["stopped"] is None
    assert row["peak_bytes"] > 0 and row["img_s"] > 0 and row["params"] > 0 and row["fit"]["points"] == 2
    assert row["paper"]["zero0@2"]["bytes_at_batch"] == pytest.approx(row["peak_bytes"])
    assert row["paper"]["zero3@4"]["model_state_bytes"] < row["paper"]["zero0@4"]["model_state_bytes"]
    assert "largest micro-batch" in r.stdout  # the printed table
