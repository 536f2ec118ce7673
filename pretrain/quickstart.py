"""`vit-pretrain quickstart`: the main job end to end on real data that ships with the package.

scikit-learn's handwritten digits (1,797 images, 10 classes) -> shards with a fixed held-out split ->
MAE pretraining of a small ViT on every training digit, labels unused -> export (checked against timm) ->
fine-tune and linear probe from the export on the first `--labels` training digits (128 by default: MAE
pays most where labels are few) -> the same ViT trained from scratch on them with the fine-tune's budget
-> the fine-tune and the baseline again with every training label -> every model evaluated on the
held-out split through its exported file in plain timm -> one table (accuracy, time) and report.png
(loss curves, MAE reconstructions, the fine-tuned model's attention; pretrain/viz/report.py).
The recipe below was chosen on a validation split carved from the training digits (docs/finetune.md).
`--seeds N` repeats the trainings with run.seed=0..N-1 and reports mean ± std over them.
Every stage goes through the same entry points a user calls (`write_shards`, `train`, `export`,
`evaluate`), on one process; the stage configs below are the embedded default.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import fsspec

from pretrain.errors import UserError

# The model: a 128-wide, 4-block ViT with 4-px patches at 16 px: the 8x8 digits upsampled 2x, 16 patches of
# 2x2 digit pixels each (at 32 px, 64 patches of one digit pixel each cost 3.4x the time per image on the CPU).
MODEL = ["model.arch=vit_micro_patch4_32", "model.img_size=16"]
# Shared by every stage: digits are not mirror-symmetric, so no flips; strokes reach the image border,
# so evaluation sees the whole image (no centre crop).
# One process has nothing to partition: ZeRO stage 0 (DeepSpeed's engine without sharding); stage 1's
# gradient buckets and fp32 partition copy buy nothing on one rank.
COMMON = ["data.hflip=0.0", "data.eval_crop_pct=1.0", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]",
          "deepspeed.zero_stage=0", "checkpoint.every_steps=0", "checkpoint.keep=1", "checkpoint.resume=never",
          "logging.every_steps=10", "logging.images_every_steps=0", "logging.progress=false"]
STAGES = {
    # MAE recipe scaled down: sin-cos positions, 75% masking, light decoder, AdamW(0.9, 0.95)
    "mae": ["task.kind=mae", "model.pos_embed=sincos", "mae.mask_ratio=0.75", "mae.norm_pix_loss=false",
            "mae.decoder_embed_dim=64", "mae.decoder_depth=1", "mae.decoder_num_heads=4",
            "data.crop_scale=[0.5,1.0]", "data.batch_size=128", "optim.lr_per_256=1.5e-3",
            "optim.betas=[0.9,0.95]", "optim.weight_decay=0.05", "optim.warmup_epochs=3"],
    # MAE fine-tune recipe: average pooling, layer decay, drop path, label smoothing; light crops and no
    # RandAugment (8x8 digits upsampled 2x: heavy crops cut strokes off); lr scanned on the validation split
    "finetune": ["task.kind=finetune", "model.global_pool=avg", "model.pos_embed=sincos",
                 "model.drop_path_rate=0.05", "finetune.layer_decay=0.85", "task.label_smoothing=0.1",
                 "data.crop_scale=[0.8,1.0]", "data.batch_size=32", "optim.lr_per_256=5e-3",
                 "optim.weight_decay=0.05", "optim.warmup_epochs=3"],
    # MAE linear-probe recipe: frozen encoder, BatchNorm + linear head, class token, no smoothing
    "linprobe": ["task.kind=linprobe", "model.pos_embed=sincos", "task.label_smoothing=0.0",
                 "data.crop_scale=[0.8,1.0]", "data.batch_size=128", "optim.lr_per_256=2e-2",
                 "optim.weight_decay=0.0", "optim.warmup_epochs=1"],
    # the baseline: the same ViT, the fine-tune's recipe and budget, random init; its own lr scan on the
    # validation split chose the fine-tune's value too
    "scratch": ["task.kind=supervised", "model.global_pool=avg", "model.drop_path_rate=0.05",
                "task.label_smoothing=0.1", "data.crop_scale=[0.8,1.0]", "data.batch_size=32",
                "optim.lr_per_256=5e-3", "optim.weight_decay=0.05", "optim.warmup_epochs=3"],
}
# "finetune": on the labelled subset; "finetune_all": on every training label (a second fine-tune from the same
# export). The from-scratch baselines ("scratch", "scratch_all") take their fine-tune's epochs.
EPOCHS = {"mae": 200, "finetune": 100, "linprobe": 100, "finetune_all": 60}
LABELS = 128  # --labels: the labelled training digits fine-tune, probe and from-scratch train on (0: all of them)
SHARD_SAMPLES = 32  # digits per shard: a labelled subset is whole shards
SMALL_STEPS = 6  # --small: optimizer steps per stage, for the test suite (a smoke test, not a result)


def _stage_config(stage: str, root: str, shards: str, epochs: float, workers: int, extra: list[str], *,
                  init_from: str = "", seed: int | None = None, name: str = "", train_urls: str = ""):
    """A stage's Config. The values this run sets (its folders, shards, workers, epochs, the export it starts
    from, the seed) are written as YAML to root/configs/<name>.yaml and loaded as the base under the recipe
    above and the user's overrides (which win): they travel as data, never as `key=value` text parsed again
    (a '#' or ': ' in --out would change them), and the whole is validated. `name`: the run's name (default:
    the stage's); `train_urls`: its training index (default: every training digit)."""
    import yaml

    from pretrain.config import load_config
    from pretrain.fs import is_local

    name = name or stage
    values: dict = {"run": {"name": name, "out_dir": f"{root}/runs"}, "optim": {"epochs": epochs},
                    "data": {"train_urls": train_urls or f"{shards}/train.json", "val_urls": f"{shards}/val.json",
                             "workers": workers}}
    if seed is not None:
        values["run"]["seed"] = seed
    if init_from:
        values["finetune"] = {"init_from": init_from}
    fs, folder = fsspec.core.url_to_fs(f"{root}/configs")
    if is_local(fs):  # object stores have no folders
        fs.makedirs(folder, exist_ok=True)
    path = f"{root}/configs/{name}.yaml"
    with fsspec.open(path, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    return load_config(path, [*MODEL, *COMMON, *STAGES[stage], *extra])


def labelled_subset(shards: str, labels: int) -> str:
    """An index of the first `labels` training digits (whole shards of the shuffled training split, so a random
    subset; the shards are shared, nothing is copied); -> its URL, shards/train_<labels>labels.json."""
    with fsspec.open(f"{shards}/train.json") as f:
        meta = json.load(f)
    counts, total = meta["counts"], meta["num_samples"]
    ends = [sum(counts[:k + 1]) for k in range(len(counts))]
    if labels not in ends:
        raise UserError(f"--labels {labels}: must be a multiple of {SHARD_SAMPLES} (the digits per shard) up to "
                        f"{total}, or 0 for every training label")
    k = ends.index(labels) + 1
    sub = {**meta, "split": f"train_{labels}labels", "shards": meta["shards"][:k], "counts": counts[:k],
           "bytes": meta["bytes"][:k], "num_samples": labels}
    url = f"{shards}/train_{labels}labels.json"
    with fsspec.open(url, "w") as f:
        json.dump(sub, f, indent=1)
    return url


def _fresh(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def held_out(weights: str, shards: str, workers: int) -> dict:
    """Top-1/top-5 of an exported file, loaded into plain timm, on the held-out split."""
    from pretrain.evaluation.evaluate import eval_stream, evaluate
    from pretrain.weights import build_timm, load_exported

    state, meta = load_exported(weights)
    stream = eval_stream(f"{shards}/val.json", meta, batch_size=256, workers=workers)
    return evaluate(build_timm(meta, state), stream, "cpu", mean=stream.data.mean, std=stream.data.std)


def knn_of(weights: str, shards: str, workers: int, k: int = 20, temperature: float = 0.07, memory: str = "") -> float:
    """Weighted k-NN top-1 of an exported encoder's features (`memory`, default the train split, as the memory;
    held-out queries)."""
    from pretrain.evaluation.evaluate import eval_stream
    from pretrain.evaluation.knn import knn_top1
    from pretrain.weights import build_timm, load_exported

    state, meta = load_exported(weights)
    train = eval_stream(memory or f"{shards}/train.json", meta, batch_size=256, workers=workers)
    val = eval_stream(f"{shards}/val.json", meta, batch_size=256, workers=workers)
    return knn_top1(build_timm(meta, state), train, val, k, temperature, "cpu", mean=val.data.mean, std=val.data.std)


def quickstart(out: str, *, small: bool = False, workers: int = 1, epochs: dict | None = None,
               extra: list[str] | None = None, seeds: int = 1, labels: int = LABELS, log=print) -> dict:
    """Write the shards once, run every stage for each seed, draw the report from the first;
    -> {"rows": [...] (mean over seeds), "per_seed": [...], "fine_tune_gain": ..., "report": ..., ...}."""
    from pretrain.data.writer import write_shards

    extra = list(extra or [])
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if seeds > 1 and any(o.startswith("run.seed=") for o in extra):
        raise UserError("--seeds sets run.seed to 0..N-1 in every stage: drop the run.seed override, or use --seeds 1")
    if labels < 0 or labels % SHARD_SAMPLES:
        raise UserError(f"--labels {labels}: must be a multiple of {SHARD_SAMPLES} (the digits per shard), "
                        "or 0 for every training label")
    epochs = epochs or {}
    ep = dict(EPOCHS, **epochs)
    if not labels:  # one fine-tune, on every label: the all-label budget unless one is given
        ep["finetune"] = epochs.get("finetune", ep["finetune_all"])
    ep["scratch"], ep["scratch_all"] = ep["finetune"], ep["finetune_all"]  # the baselines get their fine-tune's budget
    if small:
        # every step logged, so the report's loss curves have a line to draw
        extra = [f"optim.max_steps={SMALL_STEPS}", "optim.warmup_epochs=0", "optim.warmup_steps=2",
                 "logging.every_steps=1", *extra]
    t_start = time.perf_counter()
    shards = f"{out}/shards"

    t0 = time.perf_counter()
    _fresh(shards)
    res = write_shards("digits", shards, samples_per_shard=SHARD_SAMPLES, val_fraction=0.2, seed=0)
    n_train, n_val = res["splits"]["train"]["num_samples"], res["splits"]["val"]["num_samples"]
    labelled = labelled_subset(shards, labels) if labels else ""
    log(f"[quickstart] shards: {n_train} train / {n_val} held-out digits in {time.perf_counter() - t0:.1f}s"
        + (f"; {labels} of the training digits labelled" if labels else ""))

    per_seed = []
    for seed in range(seeds):
        # one seed keeps the plain layout (runs/, export/ in --out) and the user's own run.seed, if any
        root, run_seed = (out, None) if seeds == 1 else (f"{out}/seed{seed}", seed)
        per_seed.append(_one_seed(root, shards, labelled, ep, workers, small, extra, log, run_seed))

    first = out if seeds == 1 else f"{out}/seed0"
    t0 = time.perf_counter()
    report = _report(out, first, shards, small, seeds)
    log(f"[quickstart] report in {time.perf_counter() - t0:.1f}s -> {report}")
    result = {**summarize(per_seed), "per_seed": per_seed, "seeds": seeds, "total_s": time.perf_counter() - t_start,
              "n_train": n_train, "n_val": n_val, "labels": labels or n_train, "epochs": ep, "small": small,
              "report": report}
    with fsspec.open(f"{out}/results.json", "w") as f:
        json.dump(result, f, indent=2)
    with fsspec.open(f"{out}/results.md", "w") as f:
        f.write(table(result) + "\n")
    return result


def _one_seed(root: str, shards: str, labelled: str, ep: dict, workers: int, small: bool, extra: list[str], log,
              run_seed: int | None = None) -> dict:
    """The trainings (runs in root/runs, exports in root/export) and their held-out scores;
    -> {"seed", "rows", "fine_tune_gain"}. `labelled`: the labelled subset's index ("": every label);
    `run_seed`: --seeds' seed (None: the config's)."""
    from pretrain.export import export
    from pretrain.engine.trainer import train

    rows: list[dict] = []
    seed = run_seed if run_seed is not None else _stage_config("mae", root, shards, ep["mae"], workers, extra).run.seed
    some = f"{_num_samples(labelled)} labels" if labelled else "all labels"

    def run_stage(name: str, stage: str, train_urls: str = "", init_from: str = "") -> tuple[str, float, str]:
        _fresh(f"{root}/runs/{name}")
        cfg = _stage_config(stage, root, shards, ep[name], workers, extra, init_from=init_from, seed=run_seed,
                            name=name, train_urls=train_urls)
        t = time.perf_counter()
        done = train(cfg)
        seconds = time.perf_counter() - t
        weights = export(f"{root}/runs/{name}", out=f"{root}/export/{name}.safetensors")["weights"]
        log(f"[quickstart] {name} (seed {seed}): {done['step']} steps in {seconds:.0f}s -> {weights}")
        return weights, seconds, f"{done['step']} steps" if small else f"{ep[name]:g}"

    mae_w, mae_s, budget = run_stage("mae", "mae")
    knn = knn_of(mae_w, shards, workers, memory=labelled)
    rows.append({"run": "mae", "model": f"MAE pretrain (encoder, k-NN k=20, {some})", "epochs": budget, "top1": knn,
                 "top5": None, "train_s": mae_s})
    runs = [("finetune", "finetune", labelled, f"MAE -> fine-tune, {some}"),
            ("linprobe", "linprobe", labelled, f"MAE -> linear probe, {some}"),
            ("scratch", "scratch", labelled, f"from scratch, {some} (fine-tune's budget)")]
    if labelled:  # the same fine-tune and baseline with every label, beside them
        runs += [("finetune_all", "finetune", "", "MAE -> fine-tune, all labels"),
                 ("scratch_all", "scratch", "", "from scratch, all labels (fine-tune's budget)")]
    for name, stage, urls, label in runs:
        w, s, budget = run_stage(name, stage, urls, mae_w if stage in ("finetune", "linprobe") else "")
        r = held_out(w, shards, workers)
        rows.append({"run": name, "model": label, "epochs": budget, "top1": r["top1"], "top5": r["top5"],
                     "train_s": s, "n": r["n"]})
    by = {r["run"]: r for r in rows}
    return {"seed": seed, "rows": rows, "fine_tune_gain": by["finetune"]["top1"] - by["scratch"]["top1"]}


def _num_samples(index: str) -> int:
    with fsspec.open(index) as f:
        return int(json.load(f)["num_samples"])


def _report(out: str, first: str, shards: str, small: bool, seeds: int) -> str:
    """report.png in out, drawn from the runs and exports under `first` (the first seed's)."""
    from pretrain.viz.report import write_report

    title = f"vit-pretrain quickstart: {out}" + (f" (seed 0 of {seeds})" if seeds > 1 else "")
    if small:
        title += f"   --small: {SMALL_STEPS} steps per stage, a smoke test, not a result"
    return write_report(f"{out}/report.png", runs={s: f"{first}/runs/{s}" for s in STAGES},
                        mae_run=f"{first}/runs/mae", classifier=f"{first}/export/finetune.safetensors",
                        val=f"{shards}/val.json", title=title)


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for one value, or when values are missing)."""
    if any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(per_seed: list[dict]) -> dict:
    """Each row's top-1/top-5/train time, and the fine-tune gain, as mean and spread over seeds."""
    rows = []
    for i, first in enumerate(per_seed[0]["rows"]):
        same = [s["rows"][i] for s in per_seed]
        row = dict(first)
        for key in ("top1", "top5", "train_s"):
            row[key], row[f"{key}_std"] = _mean_std([r[key] for r in same])
        rows.append(row)
    gain, gain_std = _mean_std([s["fine_tune_gain"] for s in per_seed])
    return {"rows": rows, "fine_tune_gain": gain, "fine_tune_gain_std": gain_std}


def table(result: dict) -> str:
    """The results as a Markdown table (what the command prints); over several seeds, mean ± sample std."""
    n = result.get("seeds", 1)

    def pct(r: dict, key: str) -> str:
        if r[key] is None:
            return "-"
        return f"{100 * r[key]:.2f}%" if n == 1 else f"{100 * r[key]:.2f} ± {100 * r[key + '_std']:.2f}%"

    top1 = "held-out top-1" if n == 1 else f"held-out top-1 (mean ± std, {n} seeds)"
    labelled = result.get("labels", result["n_train"])
    of = f", {labelled} of them labelled" if labelled < result["n_train"] else ""
    lines = [f"held-out: {result['n_val']} digits never seen in training (train: {result['n_train']}{of})", "",
             f"| model | epochs | {top1} | top-5 | train time |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['epochs']} | {pct(r, 'top1')} | {pct(r, 'top5')} | {r['train_s']:.0f} s |")
    gain = 100 * result["fine_tune_gain"]
    if n == 1:
        lines += ["", f"MAE fine-tune vs from scratch: {gain:+.2f} points top-1; "
                  f"total wall time {result['total_s'] / 60:.1f} min"]
    else:
        each = ", ".join(f"seed {s['seed']} {100 * s['fine_tune_gain']:+.2f}" for s in result["per_seed"])
        lines += ["", f"MAE fine-tune vs from scratch: {gain:+.2f} ± {100 * result['fine_tune_gain_std']:.2f} "
                  f"points over {n} seeds; total wall time {result['total_s'] / 60:.1f} min",
                  f"per seed, MAE fine-tune minus from scratch: {each} points"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="folder for shards, runs, exports and results")
    parser.add_argument("--small", action="store_true", help="a few epochs per stage (a smoke test, not the result)")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers per stage")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run every stage with run.seed=0..N-1 (runs in OUT/seed<s>/) and report mean ± std")
    parser.add_argument("--labels", type=int, default=LABELS,
                        help=f"labelled training digits for fine-tune, linear probe and from scratch (a multiple of "
                             f"{SHARD_SAMPLES}; default {LABELS}; 0: all); MAE pretrains on every training digit "
                             "the all-label fine-tune and baseline run beside them")
    for stage in EPOCHS:
        parser.add_argument(f"--{stage.replace('_', '-')}-epochs", type=float, default=None,
                            help=f"epochs of the {stage} stage (default {EPOCHS[stage]})")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every stage, e.g. run.seed=1")


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, without its warning
    epochs = {s: getattr(args, f"{s}_epochs") for s in EPOCHS if getattr(args, f"{s}_epochs") is not None}
    result = quickstart(args.out, small=args.small, workers=args.workers, epochs=epochs, extra=args.overrides,
                        seeds=args.seeds, labels=args.labels)
    print(table(result))
    print(f"report: {result['report']}")
    from pretrain import dist as pdist

    pdist.teardown()
    return 0
