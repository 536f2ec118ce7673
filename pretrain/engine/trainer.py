"""`vit-pretrain train CONFIG [key=value ...]`: one run directory, one step loop for every task.

Exit status: 0 done, 2 user error, 75 checkpointed after SIGTERM/SIGUSR1 (requeue), 1 stopped by the
non-finite guard, 3 stopped because another rank failed, anything else a crash. `train(cfg) -> dict` is
the Python entry point.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time

import fsspec
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from pretrain import dist as pdist
from pretrain import rng
from pretrain.config import Config, load_config, split_config_args, to_yaml
from pretrain.engine import checkpoint as ckpt
from pretrain.engine.consolidate import load_source
from pretrain.engine.ds import initialize, resolve_precision
from pretrain.engine.indexes import shared_indexes
from pretrain.engine.metrics import MetricsLogger, peak_flops
from pretrain.engine.schedule import build_schedule, peak_lr
from pretrain.errors import EXIT_PEER_FAILED, EXIT_REQUEUE, UserError
from pretrain.models import model_kwargs, num_params
from pretrain.tasks import build_task, task_class

EXIT_NONFINITE = 1
FAULT_ENV = "VIT_PRETRAIN_FAULT"
"""Fault injection for the chaos tests (tests/chaos): `RANK:STEP:WHERE` makes rank RANK raise at optimizer
step STEP, in the step (`step`), in evaluation (`eval`) or in the checkpoint write (`save`), or makes its
loss NaN in that step (`nan`). STEP may be a range, `3-5`, or open, `3-`; several faults are joined with
commas. Unset in real runs."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML experiment config (see configs/pretrain)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.max_steps=100 run.name=try1")


@record  # under torchrun the failing rank's traceback is what the launcher reports (torchtitan does the same)
def run(args: argparse.Namespace) -> int:
    config, overrides = split_config_args(args.config, args.overrides)
    cfg = load_config(config, overrides)
    # the handlers stay until the process has left (never restored): a second TERM during the checkpoint
    # write, the teardown or the interpreter's exit is answered like the first (by the flag), never by the
    # default action, which would turn exit 75 into death by signal. SIGKILL still ends a stuck process.
    with _stop_signals(restore=False) as stop:
        try:
            result = train(cfg, stop)
        except NonFiniteError as e:
            pdist.abort(e)
            print(f"vit-pretrain train: stopped: {e}", file=sys.stderr)
            return EXIT_NONFINITE
        except BaseException as e:
            if not pdist.abort(e):  # says which rank failed and ends the peers now, before any other cleanup
                return EXIT_PEER_FAILED  # a consequence of a peer's failure: no traceback of its own
            raise
        pdist.teardown()
    return EXIT_REQUEUE if result.get("stopped_early") else 0


def train(cfg: Config, stop: threading.Event | None = None) -> dict:
    """Train from `cfg`; -> final metrics plus `run_dir`, `step`, `stopped_early`. `stop`: a flag the
    caller's signal handlers set (default: SIGTERM/SIGUSR1 handlers for the duration of the call)."""
    env = pdist.setup()
    if stop is not None:
        return Trainer(cfg, env, stop).fit()
    with _stop_signals() as stop:
        return Trainer(cfg, env, stop).fit()


@contextlib.contextmanager
def _stop_signals(restore: bool = True):
    """SIGTERM / SIGUSR1 (SLURM's pre-emption warning) set a flag; the loop finishes its step,
    checkpoints and returns. Further signals only set the flag again (the handler does nothing else:
    no I/O that a signal could re-enter). Handlers are restored afterwards when `restore` (only
    installed on the main thread)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    for s in previous:
        signal.signal(s, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        for s, h in previous.items() if restore else ():
            signal.signal(s, h)


def _fault_due(rank: int, step: int, where: str) -> str | None:
    """The fault of $VIT_PRETRAIN_FAULT naming this rank, step and place, or None (see FAULT_ENV)."""
    for spec in os.environ.get(FAULT_ENV, "").split(","):
        parts = spec.strip().split(":")
        if len(parts) != 3 or parts[0] != str(rank) or parts[2] != where:
            continue
        lo, dash, hi = parts[1].partition("-")
        if int(lo) == step or (dash and int(lo) <= step and (not hi or step <= int(hi))):
            return spec.strip()
    return None


def _fault(rank: int, step: int, where: str) -> None:
    """Raise when $VIT_PRETRAIN_FAULT names this rank, step and place."""
    spec = _fault_due(rank, step, where)
    if spec:
        raise RuntimeError(f"injected fault ({FAULT_ENV}={spec})")


class Trainer:
    def __init__(self, cfg: Config, env, stop: threading.Event, stream=None):
        """`stream`: any object with the train-stream interface (pretrain/data); default: built from cfg.data."""
        from pretrain.data import build_train_stream

        self.cfg, self.env, self.stop = cfg, env, stop
        self.rank, self.world = env.rank, env.world_size
        self.device = pdist.rank_device(env.local_rank, cfg.run.device)
        self.precision = resolve_precision(cfg.deepspeed, self.device)
        if cfg.task.kind == "finetune" and cfg.finetune.ema_decay > 0 and self.precision.input_dtype != torch.float32:
            raise UserError(f"config key finetune.ema_decay: a weight EMA needs fp32 weights, but deepspeed.precision="
                            f"{cfg.deepspeed.precision} (bf16_mode={cfg.deepspeed.bf16_mode}) keeps the module in "
                            f"{self.precision.input_dtype}, where updates of (1 - decay) x the change round away; "
                            "use deepspeed.bf16_mode=autocast or finetune.ema_decay=0")
        self.run_dir = f"{cfg.run.out_dir.rstrip('/')}/{cfg.run.name}"
        self.ckpt_dir = f"{self.run_dir}/checkpoints"

        self.indexes = shared_indexes(cfg, train=stream is None)  # rank 0 reads them, the others receive
        self.stream = stream if stream is not None else build_train_stream(cfg, self.rank, self.world,
                                                                           self.indexes["train"])
        if cfg.task.kind == "mae":
            self.num_classes = 0
        else:
            self.num_classes = cfg.model.num_classes if cfg.model.num_classes is not None else self.stream.num_classes
            if self.num_classes <= 0:
                raise UserError(f"task.kind={cfg.task.kind} needs classes but the training shard index names none "
                                f"({cfg.data.train_urls!r}); set model.num_classes or write shards with labels")
        accum = cfg.optim.accum_steps
        self.steps_per_epoch = self.stream.batches_per_epoch // accum
        if self.steps_per_epoch < 1:
            raise UserError(f"data.train_urls holds too few samples for one optimizer step per epoch: "
                            f"{self.stream.batches_per_epoch} batches of {cfg.data.batch_size} per rank, "
                            f"{accum} needed; lower data.batch_size or optim.accum_steps")
        self.total_steps = cfg.optim.max_steps or max(1, math.ceil(cfg.optim.epochs * self.steps_per_epoch))
        self.effective_batch = cfg.data.batch_size * accum * self.world
        self.schedule = build_schedule(cfg.optim, self.effective_batch, self.steps_per_epoch, self.total_steps)

        rng.seed_all(cfg.run.seed)  # identical initial weights on every rank (each step reseeds: rng.py)
        pretrained = load_source(cfg.finetune.init_from) if task_class(cfg.task.kind).needs_pretrained else None
        self.task = build_task(cfg, self.num_classes, pretrained)
        self.task.rank = self.rank

        if self.rank == 0:
            self._write_run_files()
        points, fallback = ckpt.resume_points(cfg.checkpoint.resume, self.ckpt_dir, rank=self.rank)
        load_universal = bool(points) and points[0].needs_universal(self.world)
        self.engine, self.ds_config = initialize(self.task, cfg, self.world, self.device, self.precision,
                                                 load_universal=load_universal)
        self.module = self.engine.module
        self.zero3 = self.engine.zero_optimization_stage() == 3
        self.mixup = self._build_mixup()
        self.fixed_images = None
        self.step, self.epoch, self.samples_seen = 0, 0, 0
        self.skipped_total, self.skipped_run = 0, 0
        self.last_good_tag = None
        if points:
            self._load(*ckpt.load_resume(self.engine, points, fallback, rank=self.rank, world_size=self.world,
                                        universal=load_universal))
        self.flops_per_image = 3.0 * self.module.flops_per_image()  # forward + backward
        self.peak = peak_flops(self.device)
        if self.world > 1:  # the stop flag travels on a CPU group: no device sync
            self.flag_group = pdist.cpu_group()
        self.log = MetricsLogger(self.run_dir, enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard,
                                 progress=cfg.logging.progress, total_steps=self.total_steps, start_step=self.step)
        self._log_derived()
        # loop state (see _iteration)
        self._batch_iter = None
        self._window = _Window(self.device)
        self.final: dict = {}
        self.max_bad = cfg.optim.max_nonfinite_steps + (32 if self.precision.name == "fp16" else 0)

    # ------------------------------------------------------------------ set-up helpers
    def _write_run_files(self) -> None:
        fs, root = fsspec.core.url_to_fs(self.run_dir)
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root}/config.yaml", "w") as f:
            f.write(to_yaml(self.cfg))
        kwargs = model_kwargs(self.cfg.model, self.num_classes)
        model = {"task": self.cfg.task.kind, "create_model": {"name": self.cfg.model.arch, **kwargs},
                 "num_classes": self.num_classes}
        with fs.open(f"{root}/model.json", "w") as f:
            json.dump(model, f, indent=2)

    def _load(self, point: ckpt.ResumePoint, tag: str, client: dict) -> None:
        """Take over a loaded checkpoint's position: step, epoch, data, RNG (the policy: ckpt.load_resume)."""
        self.step = int(client["step"])
        self.epoch = int(client["epoch"])
        self.samples_seen = int(client["samples_seen"])
        self.skipped_total = int(client.get("skipped_total", 0))
        # the schedule keeps its place in images seen (older checkpoints: derived from their steps and batch)
        horizon = client.get("schedule") or build_schedule(
            self.cfg.optim, client["effective_batch"], self.stream.num_samples // client["effective_batch"],
            client["total_steps"]).state_dict()
        self.schedule = build_schedule(self.cfg.optim, self.effective_batch, self.steps_per_epoch, self.total_steps,
                                       horizon=horizon)
        if client["effective_batch"] != self.effective_batch:
            if not self.cfg.optim.max_steps:  # the same number of images as planned, in steps of the new batch
                left = max(0, horizon["total_samples"] - self.samples_seen)
                self.total_steps = self.step + math.ceil(left / self.effective_batch)
            if self.rank == 0:
                old = peak_lr(self.cfg.optim, client["effective_batch"])
                print(f"effective batch {client['effective_batch']} -> {self.effective_batch} on resume: peak lr "
                      f"{old:.4g} -> {self.schedule.peak_lr:.4g} (optim.lr_per_256 x batch / 256); warm-up and "
                      f"cosine continue at {self.samples_seen} of {horizon['total_samples']} images", file=sys.stderr)
        per_rank = client["per_rank"]
        if len(per_rank) == self.world:
            self.stream.load_state_dict(per_rank[self.rank]["data"])
            ckpt.set_rng_state(per_rank[self.rank]["rng"])
        else:  # another world size: the stream re-splits the rest of the epoch from any rank's state
            self.stream.load_state_dict(per_rank[0]["data"])
        self.last_good_tag = point.tag if point.folder.rstrip("/") == self.ckpt_dir.rstrip("/") else None  # elsewhere: save here too
        if self.rank == 0:
            print(f"resumed from {point.folder}/{tag} at step {self.step} (epoch {self.epoch})", file=sys.stderr)

    def _build_mixup(self):
        t = self.cfg.task
        if self.cfg.task.kind == "mae" or (t.mixup_alpha <= 0 and t.cutmix_alpha <= 0):
            return None
        if self.cfg.data.batch_size % 2:
            raise UserError(f"config key data.batch_size: got {self.cfg.data.batch_size}, Mixup/CutMix needs an "
                            "even micro-batch")
        from timm.data import Mixup

        return Mixup(mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, prob=t.mixup_prob,
                     switch_prob=t.mixup_switch_prob, label_smoothing=t.label_smoothing,
                     num_classes=self.num_classes)

    def _log_derived(self) -> None:
        """Derived values, computed once: stderr, TensorBoard text and `derived.json` (never the config)."""
        s = self.schedule
        derived = {
            "world_size": self.world, "device": str(self.device), "precision": self.precision.name,
            "zero_stage": self.engine.zero_optimization_stage(), "micro_batch": self.cfg.data.batch_size,
            "accum_steps": self.cfg.optim.accum_steps, "effective_batch": self.effective_batch,
            "peak_lr": s.peak_lr, "min_lr": s.min_lr, "warmup_samples": s.warmup_samples,
            "schedule_samples": s.total_samples, "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch, "samples_per_epoch": self.stream.num_samples,
            "num_classes": self.num_classes, "params": num_params(self.module),
            "train_flops_per_image": self.flops_per_image, "start_step": self.step,
        }
        self.derived = derived
        if self.rank == 0:
            fs, root = fsspec.core.url_to_fs(self.run_dir)
            with fs.open(f"{root}/derived.json", "w") as f:
                json.dump(derived, f, indent=2)
            self.log.info("derived: " + ", ".join(f"{k}={v}" for k, v in derived.items()))
            self.log.text("derived", "\n".join(f"    {k}: {v}" for k, v in derived.items()))

    # ------------------------------------------------------------------ the loop
    def _batches(self):
        """Endless micro-batches from the stream's current position. Each epoch yields a whole number
        of optimizer steps (the stream plans whole steps per epoch)."""
        while True:
            yield from self.stream.iter_epoch_weighted(self.epoch)
            self.epoch += 1

    def _prepare(self, images: torch.Tensor, labels: torch.Tensor):
        from pretrain.data import normalize

        d = self.cfg.data
        images = normalize(images.to(self.device, non_blocking=True), d.mean, d.std).to(self.precision.input_dtype)
        labels = labels.to(self.device, non_blocking=True)
        if self.fixed_images is None:  # the pictures' images: rank's first batch, before Mixup/CutMix
            self.fixed_images = images[:4].detach().float().clone()
        if self.cfg.task.kind == "mae":
            return images, None
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        return images, labels

    def _autocast(self):
        if self.precision.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.autocast)

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal: the same answer on every rank at the same step. Many ranks
        vote every run.stop_check_steps steps (a CPU all-reduce on a gloo group: no device sync); one
        process checks every step."""
        if self.world == 1:
            return self.stop.is_set()
        if self.step % self.cfg.run.stop_check_steps:
            return False
        flag = torch.tensor([1 if self.stop.is_set() else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.flag_group)
        return bool(flag.item())

    def fit(self) -> dict:
        """Train to `total_steps` (or until a stop signal), checkpoint, evaluate; -> final metrics."""
        stopped_early = False
        self.engine.train()
        while self.step < self.total_steps:
            if self._iteration():
                stopped_early = True
                break
        self.stream.close()
        if not stopped_early:
            if self.last_good_tag != ckpt.tag_of(self.step):
                self._save()
            self.final.update(self._evaluate() or {})
        self.log.close()
        return {**self.final, "run_dir": self.run_dir, "step": self.step, "epoch": self.epoch,
                "samples_seen": self.samples_seen, "skipped_steps": self.skipped_total,
                "stopped_early": stopped_early}

    def train_steps(self, n: int) -> None:
        """Run the loop's body n times (what `vit-pretrain bench` times against a bare PyTorch loop)."""
        self.engine.train()
        for _ in range(n):
            self._iteration()

    def _iteration(self) -> bool:
        """One optimizer step and what is due after it (log, eval, k-NN, images, checkpoint).
        -> True when a stop signal was honoured (checkpoint written, the run should end)."""
        cfg, engine = self.cfg, self.engine
        accum = cfg.optim.accum_steps
        if self._batch_iter is None:
            self._batch_iter = self._batches()
        window = self._window
        lr = self.schedule(self.samples_seen, self.effective_batch)
        for g in engine.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        step_loss, loss_sum = None, 0.0
        nan_fault = _fault_due(self.rank, self.step + 1, "nan")
        for micro in range(accum):
            t0 = time.perf_counter()
            images, labels, weight, real = next(self._batch_iter)
            window.data_wait += time.perf_counter() - t0
            # every draw of this micro-step (Mixup/CutMix, drop path, ...) from a place-keyed state
            rng.seed_all(cfg.run.seed, rng.STEP, self.step * accum + micro, self.rank)
            x, y = self._prepare(images, labels)
            args, mine = (x, y, self.step * accum + micro), len(images)
            if weight is not None:  # padding in a ragged step: the task averages its loss over weight 1
                mine = float(weight.sum())  # on the host, before the copy: no device sync
                args += (weight.to(self.device, non_blocking=True),)
            with self._autocast():
                loss, metrics = engine(*args)
            if real is not None:
                # a ragged step after a re-layout (see pretrain/data/plan.py): the loss is the mean over this
                # batch's real samples; weigh it so that the step averages over every rank's real samples
                loss = loss * (mine * self.world * accum / real)
            if nan_fault:
                loss = loss * float("nan")
            loss_sum = loss_sum + loss.detach()  # on the device; read only if the step is skipped
            engine.backward(loss)
            engine.step()
            step_loss = metrics if step_loss is None else {k: step_loss[k] + v for k, v in metrics.items()}
        self.step += 1
        self.samples_seen += self.effective_batch
        _fault(self.rank, self.step, "step")
        if engine.was_step_applied():  # a Python bool DeepSpeed already holds: no extra sync
            window.add({k: v / accum for k, v in step_loss.items()})
            self.skipped_run = 0
        else:
            window.skipped += 1
            self.skipped_total += 1
            self.skipped_run += 1
            self._last_skip = self._why_skipped(loss_sum)
            if self.skipped_run >= self.max_bad:
                self._nonfinite_stop()
            overflow = self.precision.name == "fp16" and "non-finite loss" not in self._last_skip
            if self.rank == 0 and not overflow:  # fp16's loss scaler overflows by design while it finds its scale
                print(f"vit-pretrain: warning: step {self.step} skipped (no update): {self._last_skip}; "
                      f"{self.skipped_run} in a row, the run stops at {self.max_bad} "
                      "(optim.max_nonfinite_steps)", file=sys.stderr, flush=True)
        window.steps += 1
        self.log.advance()
        if self.step % cfg.logging.every_steps == 0 or self.step == self.total_steps:
            self.final = self._log_window(window, lr)
            self._window = _Window(self.device)
        if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < self.total_steps:
            self._evaluate()
        if cfg.eval.knn_every_steps and self.step % cfg.eval.knn_every_steps == 0:
            self._knn()
        if cfg.logging.images_every_steps and self.step % cfg.logging.images_every_steps == 0:
            self._images()
        if self._stop_requested():
            self._save()
            self.log.info(f"stop signal: checkpointed step {self.step}; exiting with {EXIT_REQUEUE} (requeue)")
            return True
        if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
            self._save()
        return False

    def _why_skipped(self, loss_sum) -> str:
        """Which value was not finite in a skipped step: each rank's loss, else the gradient norm. The skip
        is the same on every rank (the norm is global), so this collective runs on every rank or none."""
        mine = torch.tensor([float(loss_sum)], dtype=torch.float64)  # host read: skipped steps only
        losses = [mine]
        if self.world > 1:
            losses = [torch.zeros_like(mine) for _ in range(self.world)]
            dist.all_gather(losses, mine, group=self.flag_group)
        bad = [f"rank {r} ({v.item()})" for r, v in enumerate(losses) if not math.isfinite(v.item())]
        if bad:
            return "non-finite loss on " + ", ".join(bad)
        gn = self.engine.get_global_grad_norm()
        return f"non-finite gradient norm ({float(gn) if gn is not None else 'unknown'}), losses finite on every rank"

    def _nonfinite_stop(self):
        last = f"{self.ckpt_dir}/{self.last_good_tag}" if self.last_good_tag else "none yet"
        raise NonFiniteError(
            f"{self.skipped_run} consecutive steps with a non-finite loss or gradient norm, the last at step "
            f"{self.step}: {self._last_skip}; no update was applied, last good checkpoint: {last}. Lower "
            "optim.lr_per_256, raise optim.warmup_steps, set optim.grad_clip, or try deepspeed.precision=bf16/fp32 "
            "(optim.max_nonfinite_steps sets the limit)")

    def _log_window(self, window, lr: float) -> dict:
        values = window.read(self.world)  # the one host read of the window's sums (mean over ranks)
        elapsed = max(time.perf_counter() - window.t0, 1e-9)
        images_per_sec = window.steps * self.effective_batch / elapsed
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else None
        row = {"epoch": self.epoch, "samples": self.samples_seen, **values, "lr": lr, "grad_norm": gn,
               "images_per_sec": images_per_sec, "data_wait": window.data_wait / elapsed,
               "flops_per_sec": images_per_sec * self.flops_per_image,
               "mfu": (images_per_sec * self.flops_per_image / (self.peak * self.world)) if self.peak else None,
               "skipped_steps": window.skipped, "skipped_total": self.skipped_total}
        bad = self.stream.bad_counts()
        if any(bad.values()):
            row["bad_samples"] = sum(bad.values())
        self.log.log(self.step, {k: v for k, v in row.items() if v is not None})
        return row

    # ------------------------------------------------------------------ checkpoints, eval, images
    def _save(self) -> None:
        client = {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
                  "total_steps": self.total_steps, "effective_batch": self.effective_batch,
                  "schedule": self.schedule.state_dict(),
                  "skipped_total": self.skipped_total, "config": to_yaml(self.cfg),
                  "data_state": self.stream.state_dict()}
        _fault(self.rank, self.step, "save")
        self.last_good_tag = ckpt.save(self.engine, self.ckpt_dir, self.step, client, rank=self.rank,
                                       world_size=self.world, keep=self.cfg.checkpoint.keep)

    def _gathered(self):
        """Under ZeRO-3 gather every parameter for a pass outside the training forward (eval, pictures),
        so ranks need not run the same number of batches."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def _evaluate(self) -> dict | None:
        """engine/evaluate.py's loop on data.val_urls (unlabelled samples left out), logged as val/*."""
        if not self.cfg.data.val_urls or not hasattr(self.module, "predict"):
            return None
        from pretrain.data import build_eval_stream
        from pretrain.evaluation.evaluate import evaluate

        d = self.cfg.data

        def batches():
            for batch in build_eval_stream(d.val_urls, self.cfg, self.rank, self.world, self.indexes["val"]):
                _fault(self.rank, self.step, "eval")
                yield batch

        self.engine.eval()
        with self._gathered():
            result = evaluate(self.module, batches(), self.device, mean=d.mean, std=d.std,
                              dtype=self.precision.input_dtype, autocast=self._autocast)
        self.engine.train()
        self.log.scalars(self.step, "val", result)
        return {f"val_{k}": v for k, v in result.items()}

    def _knn(self) -> None:
        """k-NN top-1 of the encoder's features (eval.knn_*), logged as knn/top1."""
        from pretrain.data import build_eval_stream
        from pretrain.evaluation.knn import knn_top1

        e, d = self.cfg.eval, self.cfg.data
        train = build_eval_stream(e.knn_train_urls, self.cfg, self.rank, self.world, self.indexes["knn_train"])
        val = build_eval_stream(e.knn_val_urls, self.cfg, self.rank, self.world, self.indexes["knn_val"])
        with self._gathered():  # no autocast: the k-NN vote itself is fp32
            top1 = knn_top1(self.module.encoder, train, val, e.knn_k,
                            e.knn_temperature, self.device, mean=d.mean, std=d.std,
                            dtype=self.precision.input_dtype)
        self.engine.train()
        self.log.scalars(self.step, "knn", {"top1": top1})

    def _images(self) -> None:
        from pretrain.viz.tensorboard import attention_grid, mae_grid

        if self.fixed_images is None:
            return
        d = self.cfg.data
        x = self.fixed_images.to(self.precision.input_dtype)  # the module's dtype (half under fp16)
        self.engine.eval()
        with torch.no_grad(), self._gathered(), self._autocast():
            if self.cfg.task.kind == "mae":
                from pretrain.tasks.mae import mask_noise

                noise = mask_noise(self.cfg.run.seed, 0, self.rank, x.shape[0], self.module.num_patches, x.device)
                self.log.image("mae/input_masked_reconstruction", mae_grid(self.module, x, noise, d.mean, d.std), self.step)
            self.log.image("attention/last_block", attention_grid(self.module.encoder, x, d.mean, d.std), self.step)
        self.engine.train()


class _Window:
    """Sums of per-step metrics between two logging steps, kept on the device until read."""

    def __init__(self, device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counted = 0
        self.steps = 0
        self.skipped = 0
        self.data_wait = 0.0
        self.t0 = time.perf_counter()

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.counted += 1

    def read(self, world_size: int) -> dict:
        """Window means, averaged over ranks (a collective: every rank calls it at the same step)."""
        if not self.sums:  # every step of the window was skipped (on every rank: the skip is global)
            return {"loss": float("nan")}
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).div(self.counted)
        if world_size > 1:
            dist.all_reduce(values)
            values = values / world_size
        return dict(zip(keys, values.tolist()))
