"""`vit-pretrain train CONFIG [key=value ...]`: one run directory, one step loop for every task.

Exit status: 0 done, 2 user error, 75 checkpointed after SIGTERM/SIGUSR1 (requeue), 1 stopped by the
non-finite guard, 3 stopped because another rank failed, anything else a crash. `train(cfg) -> dict` is
the Python entry point.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import threading
import time

import fsspec
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from pretrain import dist as pdist
from pretrain import rng
from pretrain.config import Config, load_config, split_config_args, to_yaml
from pretrain.engine import checkpoint as ckpt
from pretrain.engine.consolidate import load_source
from pretrain.engine.ds import autocast, initialize, resolve_precision
from pretrain.engine.faults import HOLD_S, Faults
from pretrain.engine.guard import NonFiniteError, NonFiniteGuard
from pretrain.engine.indexes import shared_indexes
from pretrain.engine.kernels import WarmupClock, check_attention, compile_cache_env, pin_attention, resolve_compile
from pretrain.engine.metrics import Console, MetricsLogger, Window, peak_flops
from pretrain.engine.monitors import Monitors
from pretrain.engine.prefetch import Prefetcher
from pretrain.engine.schedule import build_schedule, peak_lr
from pretrain.engine.stopping import StopVote, stop_signals
from pretrain.errors import EXIT_REQUEUE, UserError
from pretrain.models import num_params, resolve_arch
from pretrain.tasks import build_task, model_record, task_class

EXIT_NONFINITE = 1


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
    with stop_signals(restore=False) as stop:
        return pdist.run_guarded(lambda: _train_to_exit_status(cfg, stop))


def _train_to_exit_status(cfg: Config, stop: threading.Event) -> int:
    """0 done, 75 checkpointed on a stop signal, 1 stopped by the non-finite guard (see the module docstring)."""
    try:
        result = train(cfg, stop)
    except NonFiniteError as e:
        pdist.abort(e)
        print(f"vit-pretrain train: stopped: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    pdist.teardown()
    return EXIT_REQUEUE if result.get("stopped_early") else 0


def train(cfg: Config, stop: threading.Event | None = None) -> dict:
    """Train from `cfg`; -> final metrics plus `run_dir`, `step`, `stopped_early`. `stop`: a flag the
    caller's signal handlers set (default: SIGTERM/SIGUSR1 handlers for the duration of the call)."""
    env = pdist.setup()
    if stop is not None:
        return Trainer(cfg, env, stop).fit()
    with stop_signals() as stop:
        return Trainer(cfg, env, stop).fit()


def _every(step: int, n: int) -> bool:
    """Whether something set to run every `n` steps (0: never) is due after `step`."""
    return bool(n) and step % n == 0


class Trainer:
    def __init__(self, cfg: Config, env, stop: threading.Event, stream=None):
        """A run set up to `fit`: its data, its plan of steps, its engine (at the checkpoint it resumes
        from, if any) and its logging. `stream`: any object with the train-stream interface
        (pretrain/data); default: built from cfg.data."""
        self.cfg, self.stop = cfg, stop
        self.rank, self.world = env.rank, env.world_size
        self.console = Console(enabled=self.rank == 0)
        self.faults = Faults.from_env(self.rank)
        self.device = pdist.rank_device(env.local_rank, cfg.run.device)
        self.precision = resolve_precision(cfg.deepspeed, self.device)
        task_cls = task_class(cfg)
        task_cls.check_config(cfg)
        task_cls.check_precision(cfg, self.precision.input_dtype)
        self.run_dir = f"{cfg.run.out_dir.rstrip('/')}/{cfg.run.name}"
        self.ckpt_dir = f"{self.run_dir}/checkpoints"
        # CPU collectives (the stop vote, a skipped step's losses) on a gloo group: no device sync
        self.cpu_group = pdist.cpu_group() if self.world > 1 else None
        self.vote = StopVote(stop, cfg.run.stop_check_steps, self.world, self.cpu_group)
        self.guard = NonFiniteGuard(cfg.optim.max_nonfinite_steps, self.console, fp16=self.precision.name == "fp16",
                                    world=self.world, group=self.cpu_group)
        self._open_data(stream, task_cls)
        self._plan_steps()
        self._build_engine(task_cls)
        self._start_logging()

    # ------------------------------------------------------------------ set-up steps
    def _open_data(self, stream, task_cls: type) -> None:
        """The shard indexes (read once per job), the training stream, and the classes the Task learns (0 when it
        needs no labels; a Task that needs them refuses 0)."""
        from pretrain.data import build_train_stream

        cfg = self.cfg
        self.decode = self._resolve_decode()
        self.indexes = shared_indexes(cfg, train=stream is None)  # rank 0 reads them, the others receive
        stream = stream if stream is not None else build_train_stream(
            cfg.data, self.rank, self.world, img_size=resolve_arch(cfg.model)["img_size"], augment=task_cls.augment,
            seed=cfg.run.seed, accum=cfg.optim.accum_steps, labels=task_cls.needs_labels, index=self.indexes["train"],
            decode_device=self.device if self.decode == "gpu" else None)
        # the next micro-batch is staged on the device while the current one trains (engine/prefetch.py); the
        # stream's position it reports is that of the batches trained on
        self.stream = Prefetcher(stream, self._stage, self.device)
        self.num_classes = 0
        if task_cls.needs_labels:
            self.num_classes = cfg.model.num_classes if cfg.model.num_classes is not None else self.stream.num_classes
        # starts at the first step (after a resume has set the epoch and the plan)
        self._batch_iter = self.stream.iterate(
            self._batches(), wanted=lambda: (self.total_steps - self.step) * cfg.optim.accum_steps)

    def _resolve_decode(self) -> str:
        """data.decode for this run, 'cpu' or 'gpu'; `auto` is resolved once: a run resumed in its own directory
        keeps what its config.yaml says it resolved to (a resume decodes the same way), else
        `decode_rule` (provisional) decides. `gpu` on a CPU device is refused."""
        from pretrain.data.device_decode import cores_per_gpu, decode_rule

        setting = self.cfg.data.decode
        if setting == "auto":
            earlier = self._earlier_decode()
            setting = earlier or decode_rule(self.cfg.data, self.device, cores_per_gpu())
            how = "as this run resolved it before" if earlier else "by the provisional rule (docs/data.md)"
            self.console.info(f"data.decode=auto: {setting}, {how}")
        if setting == "gpu" and self.device.type != "cuda":
            raise UserError(f"config key data.decode: got 'gpu', but this run trains on the CPU ({self.device}): "
                            "decode on the CPU (data.decode=cpu or auto), or train on a CUDA device")
        return setting

    def _earlier_decode(self) -> str | None:
        """What `auto` resolved to when this run directory started before (its config.yaml), when resuming in it
        and this device can decode that way; else None."""
        import yaml

        if self.cfg.checkpoint.resume != "auto":
            return None
        fs, root = fsspec.core.url_to_fs(self.run_dir)
        if not fs.exists(f"{root}/config.yaml"):
            return None
        with fs.open(f"{root}/config.yaml") as f:
            earlier = ((yaml.safe_load(f) or {}).get("data") or {}).get("decode")
        usable = earlier == "cpu" or (earlier == "gpu" and self.device.type == "cuda")
        return earlier if usable else None

    def resolved_config(self) -> Config:
        """The config as this run resolved it (data.decode's `auto` replaced): what config.yaml and checkpoints
        hold. A copy: the config itself is never changed."""
        return dataclasses.replace(self.cfg, data=dataclasses.replace(self.cfg.data, decode=self.decode))

    def _plan_steps(self) -> None:
        """Optimizer steps per epoch and in all, the effective batch and the lr schedule, derived once."""
        cfg, accum = self.cfg, self.cfg.optim.accum_steps
        self.steps_per_epoch = self.stream.batches_per_epoch // accum
        if self.steps_per_epoch < 1:
            raise UserError(f"data.train_urls holds too few samples for one optimizer step per epoch: "
                            f"{self.stream.batches_per_epoch} batches of {cfg.data.batch_size} per rank, "
                            f"{accum} needed; lower data.batch_size or optim.accum_steps")
        self.total_steps = cfg.optim.max_steps or max(1, math.ceil(cfg.optim.epochs * self.steps_per_epoch))
        self.effective_batch = cfg.data.batch_size * accum * self.world
        self.schedule = build_schedule(cfg.optim, self.effective_batch, self.steps_per_epoch, self.total_steps)

    def _build_engine(self, task_cls: type) -> None:
        """The Task, with the same initial weights on every rank, in a DeepSpeed engine; at the position of
        the checkpoint it resumes from (checkpoint.resume), if any."""
        cfg = self.cfg
        rng.seed_all(cfg.run.seed)  # identical initial weights on every rank (each step reseeds: rng.py)
        pretrained = load_source(cfg.finetune.init_from) if task_cls.needs_pretrained else None
        self.task = build_task(cfg, self.num_classes, pretrained)
        self.task.rank = self.rank
        if self.rank == 0:
            self._write_run_files()
        points, fallback = ckpt.resume_points(cfg.checkpoint.resume, self.ckpt_dir, warn=self.console.warn)
        universal = bool(points) and points[0].needs_universal(self.world)
        self._choose_kernels()
        self.engine, self.ds_config = initialize(self.task, cfg, self.world, self.device, self.precision,
                                                 load_universal=universal, compile=self.compiled)
        self.module = self.engine.module
        self.zero3 = self.engine.zero_optimization_stage() == 3
        self.mixup = self._build_mixup() if task_cls.needs_labels else None
        self.step, self.epoch, self.samples_seen = 0, 0, 0
        self._source_base: dict = {}  # per-source totals at the checkpoint resumed from (a mixture)
        self.last_good_tag = None
        if points:
            self._load(*ckpt.load_resume(self.engine, points, fallback, rank=self.rank, world_size=self.world,
                                        universal=universal, warn=self.console.warn))
        self._warmup = WarmupClock(cfg.optim.accum_steps, self.step, self.console.info if self.compiled else None)

    def _choose_kernels(self) -> None:
        """model.compile resolved for this device and ZeRO stage (its cache in the run directory), and
        model.attention_backend pinned on the Task and checked on the attention's real shapes; on CUDA the
        SDPA backend serving each attention is said once (`self.attention`, in the derived values)."""
        cfg = self.cfg
        self.compiled = resolve_compile(cfg.model.compile, self.device, cfg.deepspeed.zero_stage, self.console.info)
        if self.compiled:
            for k, v in compile_cache_env(self.run_dir).items():
                self.console.info(f"model.compile: {k}={v} (kept across requeues of this run)")
        setting = cfg.model.attention_backend
        pin_attention(self.task, setting)
        self.attention = setting
        if setting != "auto" or self.device.type == "cuda":
            served = check_attention(setting, self.task, self.precision.autocast or self.precision.input_dtype,
                                     self.device)
            self.attention = " ".join(f"{where}={b}" for where, b in served.items())
            self.console.info(f"attention: SDPA backend {self.attention} (model.attention_backend={setting})")

    def _write_run_files(self) -> None:
        fs, root = fsspec.core.url_to_fs(self.run_dir)
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root}/config.yaml", "w") as f:
            f.write(to_yaml(self.resolved_config()))
        with fs.open(f"{root}/model.json", "w") as f:
            json.dump(model_record(self.cfg, self.num_classes), f, indent=2)

    def _build_mixup(self):
        t = self.cfg.task
        if t.mixup_alpha <= 0 and t.cutmix_alpha <= 0:
            return None
        if self.cfg.data.batch_size % 2:
            raise UserError(f"config key data.batch_size: got {self.cfg.data.batch_size}, Mixup/CutMix needs an "
                            "even micro-batch")
        from timm.data import Mixup

        return Mixup(mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, prob=t.mixup_prob,
                     switch_prob=t.mixup_switch_prob, label_smoothing=t.label_smoothing,
                     num_classes=self.num_classes)

    def _load(self, point: ckpt.ResumePoint, tag: str, client: dict) -> None:
        """Take over a loaded checkpoint's position: step, epoch, images seen, schedule, data (the policy:
        ckpt.load_resume). A checkpoint of an earlier version may also hold RNG states: unused, every draw
        is seeded from the run's position (pretrain/rng.py)."""
        self.step, self.epoch = int(client["step"]), int(client["epoch"])
        self.samples_seen, self.guard.total = int(client["samples_seen"]), int(client["skipped_total"])
        self._source_base = client.get("source_counts", {})
        horizon = client["schedule"]  # warm-up and cosine keep their place in images seen
        self.schedule = build_schedule(self.cfg.optim, self.effective_batch, self.steps_per_epoch, self.total_steps,
                                       horizon=horizon)
        if client["effective_batch"] != self.effective_batch:
            if not self.cfg.optim.max_steps:  # the same number of images as planned, in steps of the new batch
                left = max(0, horizon["total_samples"] - self.samples_seen)
                self.total_steps = self.step + math.ceil(left / self.effective_batch)
            old = peak_lr(self.cfg.optim, client["effective_batch"])
            self.console.info(f"effective batch {client['effective_batch']} -> {self.effective_batch} on resume: "
                              f"peak lr {old:.4g} -> {self.schedule.peak_lr:.4g} (optim.lr_per_256 x batch / 256); "
                              f"warm-up and cosine continue at {self.samples_seen} of {horizon['total_samples']} "
                              "images")
        per_rank = client["per_rank"]
        # on another world size the stream re-splits the rest of the epoch from any rank's position
        self.stream.load_state_dict(per_rank[self.rank if len(per_rank) == self.world else 0]["data"])
        here = point.folder.rstrip("/") == self.ckpt_dir.rstrip("/")
        self.last_good_tag = point.tag if here else None  # resumed from elsewhere: the first save is here
        self.console.info(f"resumed from {point.folder}/{tag} at step {self.step} (epoch {self.epoch})")

    def _start_logging(self) -> None:
        """The metrics logger and the monitors that write to it, the derived values said once, and the
        logging window's state."""
        cfg = self.cfg
        self.flops_per_image = 3.0 * self.module.flops_per_image()  # forward + backward
        self.peak = peak_flops(self.device)
        self.log = MetricsLogger(self.run_dir, self.console, tensorboard=cfg.logging.tensorboard,
                                 progress=cfg.logging.progress, total_steps=self.total_steps, start_step=self.step)
        self.monitors = Monitors(cfg, self.engine, self.precision, self.device, self.log, self.faults,
                                 rank=self.rank, world=self.world, indexes=self.indexes)
        self._log_derived()
        self._window, self._lr, self.final, self.fixed_images = Window(), 0.0, {}, None
        self.data_wait_s = 0.0  # seconds waited for batches since start, never reset (what `bench feed` reads)

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
            "compile": self.compiled, "attention": self.attention, "decode": self.decode,
        }
        self.derived = derived
        if self.rank == 0:
            fs, root = fsspec.core.url_to_fs(self.run_dir)
            with fs.open(f"{root}/derived.json", "w") as f:
                json.dump(derived, f, indent=2)
        self.console.info("derived: " + ", ".join(f"{k}={v}" for k, v in derived.items()))
        self.log.text("derived", "\n".join(f"    {k}: {v}" for k, v in derived.items()))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to `total_steps` (or until a stop signal), checkpoint, evaluate; -> final metrics."""
        stopped_early = False
        self.engine.train()
        while self.step < self.total_steps and not stopped_early:
            stopped_early = self._iteration()
        self._end_data()
        if not stopped_early:
            if self.last_good_tag != ckpt.tag_of(self.step):
                self._save()
            self.final.update(self.monitors.evaluate(self.step) or {})
        self.log.close()
        if not stopped_early:
            self._say_done()
        return {**self.final, "run_dir": self.run_dir, "step": self.step, "epoch": self.epoch,
                "samples_seen": self.samples_seen, "skipped_steps": self.guard.pending(),
                "stopped_early": stopped_early}

    def close(self) -> None:
        """End the data workers and the logs of a run driven by `train_steps` (no checkpoint, no evaluation)."""
        self._end_data()
        self.log.close()

    def _end_data(self) -> None:
        """The vote in flight waited for, the data workers ended: after a run's last step."""
        self.vote.close()
        self._batch_iter.close()  # an epoch left mid-way shuts its loader's workers down now, not at collection
        self.stream.close()

    def train_steps(self, n: int) -> None:
        """Run the loop's body n times (what `vit-pretrain bench` times against a bare PyTorch loop)."""
        self.engine.train()
        for _ in range(n):
            self._iteration()

    def _iteration(self) -> bool:
        """One optimizer step, then what is due after it. -> True when a stop signal was honoured
        (checkpoint written: the run should end)."""
        self._optimizer_step()
        s, c = self.step, self.cfg
        last = s == self.total_steps
        due = [(_every(s, c.logging.every_steps) or last, self._log_window),
               (_every(s, c.eval.every_steps) and not last, lambda: self.monitors.evaluate(s)),  # the last: fit's
               (_every(s, c.eval.knn_every_steps), lambda: self.monitors.knn(s)),
               (_every(s, c.logging.images_every_steps) and self.fixed_images is not None,
                lambda: self.monitors.pictures(s, self.fixed_images))]
        for is_due, action in due:
            if is_due:
                action()
        if self.faults.due(s, "hold"):  # injected: wait for a test's stop signal (pretrain/engine/faults.py)
            self.stop.wait(HOLD_S)
        if self.vote(s):  # checkpoint, end
            self._save()
            self.console.info(f"stop signal: checkpointed step {s}; exiting with {EXIT_REQUEUE} (requeue)")
            return True
        if _every(s, c.checkpoint.every_steps):
            self._save()
        return False

    def _optimizer_step(self) -> None:
        """optim.accum_steps micro-steps, DeepSpeed stepping the optimizer after the last; the step's metrics
        go to the logging window, or the skip is counted when the optimizer did not apply it."""
        accum = self.cfg.optim.accum_steps
        self._lr = self.schedule(self.samples_seen, self.effective_batch)
        for g in self.engine.optimizer.param_groups:
            g["lr"] = self._lr * g.get("lr_scale", 1.0)
        nan = self.faults.due(self.step + 1, "nan") is not None
        metrics, loss_sum = None, 0.0
        for micro in range(accum):
            loss, m = self._micro_step(self.step * accum + micro, nan)
            loss_sum = loss_sum + loss  # on the device; read only for a window with a skipped step
            metrics = m if metrics is None else {k: metrics[k] + v for k, v in m.items()}
        self.step += 1
        self.samples_seen += self.effective_batch
        self.faults.check(self.step, "step")
        skipped = self._step_skipped()
        self._window.add({k: v / accum for k, v in metrics.items()}, skipped)
        self.guard.record(skipped, loss_sum, self.step)
        self.log.advance()

    def _step_skipped(self) -> torch.Tensor:
        """1.0 when the step made no update, 0.0 when it did: a 0-dim tensor on the device. At ZeRO 0 the
        optimizer's own flag (engine/ds.py `guarded`: never read here); above, DeepSpeed's Python bool."""
        found_inf = getattr(self.engine.optimizer, "found_inf", None)
        if found_inf is not None:
            return found_inf
        return torch.full((), float(not self.engine.was_step_applied()), device=self.device)

    def _micro_step(self, index: int, nan: bool) -> tuple[torch.Tensor, dict]:
        """Forward and backward of the next micro-batch, then DeepSpeed's step (it applies the optimizer
        at the step's last). `index`: the global micro-batch index. -> (loss, detached; metrics)."""
        self._warmup.micro(index)
        t0 = time.perf_counter()
        self.epoch, (images, labels, weight, real, mine) = next(self._batch_iter)
        waited = time.perf_counter() - t0
        self._window.data_wait += waited
        self.data_wait_s += waited
        # every draw of this micro-step (Mixup/CutMix, drop path, ...) from a place-keyed state
        rng.seed_all(self.cfg.run.seed, rng.STEP, index, self.rank)
        x, y = self._prepare(images, labels)
        args = (x, y, index)
        if weight is not None:  # padding in a ragged step: the task averages its loss over weight 1
            args += (weight,)
        with autocast(self.precision, self.device):
            loss, metrics = self.engine(*args)
        if real is not None:
            # a ragged step after a re-layout (see pretrain/data/plan.py): the loss is the mean over this
            # batch's real samples; weigh it so that the step averages over every rank's real samples
            loss = loss * (mine * self.world * self.cfg.optim.accum_steps / real)
        if nan:  # injected (pretrain/engine/faults.py)
            loss = loss * float("nan")
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach(), metrics

    def _batches(self):
        """Endless (epoch, host micro-batch) from the stream's current position. Each epoch yields a whole
        number of optimizer steps (the stream plans whole steps per epoch)."""
        epoch = self.epoch
        while True:
            for batch in self.stream.inner.iter_epoch_weighted(epoch):
                yield epoch, batch
            epoch += 1

    def _stage(self, images: torch.Tensor, labels: torch.Tensor, weight, real):
        """A host micro-batch on the device (on the prefetcher's side stream: device work only) -> (normalised
        images in the module's dtype, labels or None, weight or None, the step's real samples or None, this
        batch's samples: its weight's sum in a ragged step, read on the host before the copy)."""
        from pretrain.data import normalize

        d = self.cfg.data
        mine = len(images) if weight is None else float(weight.sum())
        images = normalize(images.to(self.device, non_blocking=True), d.mean, d.std).to(self.precision.input_dtype)
        labels = labels.to(self.device, non_blocking=True) if self.module.needs_labels else None
        weight = weight.to(self.device, non_blocking=True) if weight is not None else None
        return images, labels, weight, real, mine

    def _prepare(self, images: torch.Tensor, labels: torch.Tensor | None):
        """Staged images and labels -> (images, targets: None when the Task needs no labels, else class
        indices or Mixup/CutMix's soft targets)."""
        if self.fixed_images is None:  # the pictures' images: rank's first batch, before Mixup/CutMix
            self.fixed_images = images[:4].detach().float().clone()
        if not self.module.needs_labels:
            return images, None
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        return images, labels

    def _log_window(self) -> None:
        """One metrics row: the window's means over its steps and the ranks, throughput and MFU."""
        window, self._window = self._window, Window()
        values, stats = window.read(self.world, self.guard.stats())  # the window's one host read
        last_good = f"{self.ckpt_dir}/{self.last_good_tag}" if self.last_good_tag else "none yet"
        skipped = self.guard.check(stats, self.engine, last_good) if stats else 0  # may end the run
        elapsed = max(time.perf_counter() - window.t0, 1e-9)
        images_per_sec = window.steps * self.effective_batch / elapsed
        gn = self.engine.get_global_grad_norm()
        row = {"epoch": self.epoch, "samples": self.samples_seen, **values, "lr": self._lr,
               "grad_norm": float(gn) if gn is not None else None,
               "images_per_sec": images_per_sec, "data_wait": window.data_wait / elapsed,
               "flops_per_sec": images_per_sec * self.flops_per_image,
               "mfu": (images_per_sec * self.flops_per_image / (self.peak * self.world)) if self.peak else None,
               "skipped_steps": skipped, "skipped_total": self.guard.total}
        bad = self.stream.bad_counts()
        if any(bad.values()):
            row["bad_samples"] = sum(bad.values())
        self.log.log(self.step, {k: v for k, v in row.items() if v is not None})
        sources = self._source_totals()
        if sources:
            self.log.scalars(self.step, "data", {f"{n}/{k}": v for n, c in sources.items() for k, v in c.items()})
        self.final = row

    def _source_totals(self) -> dict[str, dict[str, int]]:
        """A mixture's samples and bad samples per source since the run began, summed over ranks (a collective
        on the CPU group: every rank calls it at the same step); {} for one source."""
        local = self.stream.source_counts()
        if not local:
            return {}
        counts = torch.tensor([[c["samples"], c["bad"]] for c in local.values()], dtype=torch.int64)
        if self.world > 1:
            torch.distributed.all_reduce(counts, group=self.cpu_group)
        base = self._source_base
        return {n: {"samples": int(a) + base.get(n, {}).get("samples", 0),
                    "bad": int(b) + base.get(n, {}).get("bad", 0)} for n, (a, b) in zip(local, counts.tolist())}

    def _say_done(self) -> None:
        """The run's last line: how far it got, where its files are, and what to run next."""
        loss, top1 = self.final.get("loss"), self.final.get("val_top1")
        result = f", loss {loss:.4f}" if loss is not None else ""
        result += f", val top-1 {top1:.4f}" if top1 is not None else ""
        self.console.info(f"vit-pretrain train: done: {self.step} steps{result}; checkpoint "
                          f"{self.ckpt_dir}/{self.last_good_tag}, metrics {self.run_dir}/metrics.jsonl; "
                          f"export with: vit-pretrain export {shlex.quote(self.run_dir)}")

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        client = {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
                  "total_steps": self.total_steps, "effective_batch": self.effective_batch,
                  "schedule": self.schedule.state_dict(),
                  "skipped_total": self.guard.pending(), "config": to_yaml(self.resolved_config()),
                  "source_counts": self._source_totals(),
                  "data_state": self.stream.state_dict()}
        self.faults.check(self.step, "save")
        self.last_good_tag = ckpt.save(self.engine, self.ckpt_dir, self.step, client, rank=self.rank,
                                       world_size=self.world, keep=self.cfg.checkpoint.keep)
