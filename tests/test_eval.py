"""`vit-pretrain eval` (one and two processes), the reusable evaluate loop, and the weighted k-NN monitor."""
import json
import os
import sys

import pytest
import torch

import pretrain  # noqa: F401  (timm import fix-up)
from test_finetune import export_nano


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from pretrain.data.writer import write_shards

    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", str(out), samples_per_shard=200, val_fraction=0.2, seed=0)
    return out


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "clf.safetensors"
    export_nano(path, num_classes=10)
    return path


def test_eval_json(digits, classifier, cli):
    p = cli("eval", str(classifier), "--data", str(digits / "val.json"), "--batch-size", "64", "--workers", "1",
            "--out", str(digits / "eval.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout)
    assert result["n"] == 359
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert result["loss"] > 0 and result["loss"] == pytest.approx(result["loss"])
    assert json.loads((digits / "eval.json").read_text()) == result


def test_evaluate_counts_match_a_direct_computation(digits, classifier):
    from pretrain.data import normalize
    from pretrain.evaluation.evaluate import eval_stream, evaluate
    from pretrain.weights import build_timm, load_exported

    state, meta = load_exported(str(classifier))
    model = build_timm(meta, state)
    torch.manual_seed(0)
    with torch.no_grad():  # a head that actually separates classes a little
        model.head.weight.normal_(std=2.0)
    stream = eval_stream(str(digits / "val.json"), meta, batch_size=50, workers=0)
    d = stream.data
    result = evaluate(model, stream, "cpu", mean=d.mean, std=d.std)
    logits, labels = [], []
    with torch.no_grad():
        for images, y in stream:
            logits.append(model(normalize(images, d.mean, d.std)))
            labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)
    assert result["n"] == len(labels) == 359
    assert result["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert not model.training or True


@pytest.mark.slow
def test_eval_two_processes_equals_one(digits, classifier, cli):
    from conftest import free_port, run_job

    one = json.loads(cli("eval", str(classifier), "--data", str(digits / "val.json"), "--workers", "0").stdout)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "pretrain", "eval", str(classifier), "--data", str(digits / "val.json"), "--workers", "0",
           "--batch-size", "32"]
    p = run_job(cmd, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.loads(p.stdout)  # rank 0 alone prints
    assert two["n"] == one["n"] == 359
    for k in ("top1", "top5", "loss"):
        assert two[k] == pytest.approx(one[k], rel=1e-6)


def test_eval_rejects_a_headless_encoder(digits, tmp_path, cli):
    export_nano(tmp_path / "enc.safetensors", num_classes=0)
    p = cli("eval", str(tmp_path / "enc.safetensors"), "--data", str(digits / "val.json"))
    assert p.returncode == 2 and "no classifier head" in p.stderr and "Traceback" not in p.stderr
    p = cli("eval", str(tmp_path / "missing.safetensors"), "--data", str(digits / "val.json"))
    assert p.returncode == 2 and "not found" in p.stderr


def test_knn_vote_is_weighted():
    from pretrain.evaluation.knn import knn_classify

    train_f = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]), dim=1)
    train_y = torch.tensor([0, 0, 1, 1, 1])
    val_f = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    # k=5: class 1 has three votes, but the two close class-0 neighbours outweigh them at a low temperature
    assert knn_classify(train_f, train_y, val_f, k=5, temperature=0.07, num_classes=2).tolist() == [0, 1]
    # at a very high temperature every vote weighs the same: the majority wins
    assert knn_classify(train_f, train_y, val_f, k=5, temperature=1e6, num_classes=2).tolist() == [1, 1]


def test_knn_top1_on_digits(digits):
    from pretrain.evaluation.evaluate import eval_stream
    from pretrain.evaluation.knn import knn_top1
    from pretrain.models import create_model

    torch.manual_seed(0)
    encoder = create_model("vit_nano_patch4_16", num_classes=0)
    meta = {"timm_kwargs": {"img_size": 16, "patch_size": 4}}
    train = eval_stream(str(digits / "train.json"), meta, batch_size=128, workers=0)
    val = eval_stream(str(digits / "val.json"), meta, batch_size=128, workers=0)
    top1 = knn_top1(encoder, train, val, k=20, temperature=0.07, device="cpu", mean=val.data.mean, std=val.data.std)
    assert 0.25 < top1 <= 1.0, top1  # even random ViT features separate digits well above chance (0.1)
    assert encoder.training  # left as found
