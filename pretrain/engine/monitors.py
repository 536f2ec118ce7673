"""What the loop runs every so many steps besides training: validation on data.val_urls, the k-NN monitor
(eval.knn_*) and the Task's TensorBoard pictures. Each passes over the module outside its training forward,
so under ZeRO-3 every parameter is gathered first: ranks need not run the same number of batches."""
from __future__ import annotations

import contextlib

import torch

from pretrain.engine.ds import autocast
from pretrain.engine.kernels import eager


class Monitors:
    def __init__(self, cfg, engine, precision, device, log, faults, *, rank: int, world: int, indexes: dict):
        self.cfg, self.engine, self.module = cfg, engine, engine.module
        self.precision, self.device, self.log, self.faults = precision, device, log, faults
        self.rank, self.world = rank, world
        self.indexes = indexes  # read once per job (engine/indexes.py)
        self.zero3 = engine.zero_optimization_stage() == 3

    def evaluate(self, step: int) -> dict | None:
        """evaluation/evaluate.py's loop (unlabelled samples left out), logged as val/* -> {val_*: value};
        None without data.val_urls or for a Task that does not classify."""
        if not self.cfg.data.val_urls or not hasattr(self.module, "predict"):
            return None
        from pretrain.evaluation.evaluate import evaluate

        d = self.cfg.data

        def batches():
            for batch in self._eval_stream(d.val_urls, "val"):
                self.faults.check(step, "eval")
                yield batch

        with self._outside_training():
            result = evaluate(self.module, batches(), self.device, mean=d.mean, std=d.std,
                              dtype=self.precision.input_dtype, autocast=lambda: autocast(self.precision, self.device))
        self.log.scalars(step, "val", result)
        return {f"val_{k}": v for k, v in result.items()}

    def knn(self, step: int) -> None:
        """k-NN top-1 of the encoder's features, logged as knn/top1."""
        from pretrain.evaluation.knn import knn_top1

        e, d = self.cfg.eval, self.cfg.data
        with self._outside_training():  # no autocast: the k-NN vote itself is fp32
            top1 = knn_top1(self.module.encoder, self._eval_stream(e.knn_train_urls, "knn_train"),
                            self._eval_stream(e.knn_val_urls, "knn_val"), e.knn_k,
                            e.knn_temperature, self.device, mean=d.mean, std=d.std,
                            dtype=self.precision.input_dtype)
        self.log.scalars(step, "knn", {"top1": top1})

    def _eval_stream(self, urls, name: str):
        """A split's eval stream at the model's input size (data.* settings: batch, workers, crop, normalisation),
        from the index read at start-up (`name` in engine/indexes.py)."""
        from pretrain.data import build_eval_stream
        from pretrain.models import resolve_arch

        return build_eval_stream(urls, self.cfg.data, self.rank, self.world,
                                 img_size=resolve_arch(self.cfg.model)["img_size"], index=self.indexes.get(name))

    def pictures(self, step: int, images: torch.Tensor) -> None:
        """The Task's pictures (Task.pictures) of `images` (B, C, H, W), normalised, in fp32."""
        d = self.cfg.data
        x = images.to(self.precision.input_dtype)  # the module's dtype (half under fp16)
        with self._outside_training(), torch.no_grad(), autocast(self.precision, self.device):
            pictures = self.module.pictures(x, d.mean, d.std)
        for tag, grid in pictures.items():
            self.log.image(tag, grid, step)

    @contextlib.contextmanager
    def _outside_training(self):
        """Eval mode, compiled blocks run eagerly (the training graphs stay as they are: kernels.eager), and under
        ZeRO-3 every parameter gathered; back to training mode after."""
        self.engine.eval()
        gathered = contextlib.nullcontext()
        if self.zero3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        with gathered, eager():
            yield
        self.engine.train()
