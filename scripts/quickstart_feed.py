"""What the data path costs a quickstart stage: the stage's own config (pretrain/quickstart.py) trained by one
Trainer fed from the digit shards (its DataLoader workers) and by another on one synthetic in-memory batch of
the same shape (bench step's MemoryStream), windows of steps interleaved, medians printed as JSON; and one
data worker's time per image (the stream iterated in this process, no training). Measured on this machine;
where the cores are few the workers take them from the step (docs/finetune.md, "What makes a CPU step
cheaper").

    .venv/bin/python scripts/quickstart_feed.py --stages mae,scratch
"""
import argparse
import json
import os
import statistics
import tempfile
import threading
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def worker_us_per_image(cfg, epochs: int) -> float:
    """The train stream read in this process (workers=0): microseconds per image, decode and augmentation
    included."""
    import dataclasses

    from pretrain.data import build_train_stream
    from pretrain.models import resolve_arch
    from pretrain.tasks import task_class

    data = dataclasses.replace(cfg.data, workers=0)
    stream = build_train_stream(data, 0, 1, img_size=resolve_arch(cfg.model)["img_size"],
                                augment=task_class(cfg).augment, seed=cfg.run.seed)
    n, t = 0, time.perf_counter()
    for epoch in range(epochs):
        for _, y, _, _ in stream.iter_epoch_weighted(epoch):
            n += len(y)
    return 1e6 * (time.perf_counter() - t) / n


def measure(stage: str, root: str, shards: str, steps: int, rounds: int, workers: int) -> dict:
    from pretrain import dist as pdist
    from pretrain import quickstart as q
    from pretrain.bench.step import MemoryStream, synthetic_batch
    from pretrain.engine.trainer import Trainer
    from pretrain.models import resolve_arch

    cfg = q._stage_config(stage, root, shards, 1000, workers, ["eval.every_steps=0"], name=f"feed_{stage}")
    env = pdist.setup()
    images, labels = synthetic_batch(cfg.data.batch_size, resolve_arch(cfg.model)["img_size"], 10)
    trainers = {"fed": Trainer(cfg, env, threading.Event()),
                "synthetic": Trainer(cfg, env, threading.Event(), stream=MemoryStream(images, labels, 10))}
    times: dict[str, list[float]] = {k: [] for k in trainers}
    try:
        for tr in trainers.values():
            tr.train_steps(20)  # warm-up; the fed one's workers started
        for _ in range(rounds):
            for name, tr in trainers.items():
                t = time.perf_counter()
                tr.train_steps(steps)
                times[name].append((time.perf_counter() - t) / steps)
    finally:
        for tr in trainers.values():
            tr.close()
    fed, syn = statistics.median(times["fed"]), statistics.median(times["synthetic"])
    return {"stage": stage, "batch": cfg.data.batch_size, "workers": workers, "fed_ms": round(1e3 * fed, 2),
            "synthetic_ms": round(1e3 * syn, 2), "fed_over_synthetic_rate": round(syn / fed, 3),
            "worker_us_per_image": round(worker_us_per_image(cfg, 3), 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="mae,scratch", help="quickstart stages (the fine-tune's recipe is "
                    "`scratch` without its MAE init)")
    ap.add_argument("--steps", type=int, default=60, help="steps per timed window")
    ap.add_argument("--rounds", type=int, default=4, help="windows per trainer, interleaved")
    ap.add_argument("--workers", type=int, default=1, help="data.workers (the quickstart's default: 1)")
    args = ap.parse_args()
    from pretrain.data.writer import write_shards

    with tempfile.TemporaryDirectory() as root:
        shards = f"{root}/shards"
        write_shards("digits", shards, samples_per_shard=32, val_fraction=0.2, seed=0)
        for stage in args.stages.split(","):
            print(json.dumps(measure(stage, root, shards, args.steps, args.rounds, args.workers)), flush=True)
    from pretrain import dist as pdist

    pdist.teardown()


if __name__ == "__main__":
    main()
