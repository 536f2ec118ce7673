"""The input off the critical path: the next micro-batch is copied to the device and normalised on a side CUDA
stream while the current step computes (the host batch is already in pinned memory). On the CPU the same code
runs without a stream, so both devices take one path and see the same batches.

Reading one batch ahead moves the train stream one batch past what the model has trained on; `Prefetcher`
therefore answers for the stream's position (state_dict, bad and per-source counts) as of the batches it has
handed out, so a checkpoint resumes at the first batch not yet trained on, exactly as without prefetching.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch


class Prefetcher:
    """A train stream (pretrain/data `BatchStream`) whose batches `iterate` hands out staged on the device.

    `stage(images, labels, weight, real)` -> a tuple of staged values (tensors on the device and host
    values): it runs on the side stream on CUDA, so it must only enqueue device work (no host reads).
    """

    def __init__(self, stream, stage: Callable[..., tuple], device: torch.device):
        self.inner, self._stage, self.device = stream, stage, device
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._at: dict | None = None  # the stream's position as of the batches handed out, while one is staged

    def __getattr__(self, name: str) -> Any:  # num_samples, batches_per_epoch, load_state_dict, close, ...
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def state_dict(self) -> dict:
        return self._at["state"] if self._at else self.inner.state_dict()

    def bad_counts(self) -> dict[str, int]:
        return self._at["bad"] if self._at else self.inner.bad_counts()

    def source_counts(self) -> dict[str, dict[str, int]]:
        return self._at["sources"] if self._at else self.inner.source_counts()

    def iterate(self, batches: Iterator[tuple[int, tuple]], wanted: Callable[[], int]) -> Iterator[tuple[int, tuple]]:
        """(epoch, staged) for each (epoch, host batch) of `batches`, the next one staged while the caller works
        on the current one. `wanted()` (asked once, at the first batch): how many batches the run will take;
        none is read ahead past that many (a run's last step starts no new epoch), later ones are staged on
        demand."""
        pending, n, total = None, 0, None
        try:
            while True:
                total = wanted() if total is None else total
                epoch, staged, ready = pending if pending is not None else self._stage_next(batches)
                pending, self._at = None, None
                self._hand_over(staged, ready)
                n += 1
                if n < total:  # read the next one ahead, remembering where the stream stood before it
                    self._at = {"state": self.inner.state_dict(), "bad": self.inner.bad_counts(),
                                "sources": self.inner.source_counts()}
                    pending = self._stage_next(batches)
                yield epoch, staged
        finally:
            self._at = None
            batches.close()

    def _stage_next(self, batches) -> tuple[int, tuple, torch.cuda.Event | None]:
        if self._side is None:
            epoch, host = next(batches)
            return epoch, self._stage(*host), None
        # no wait for the compute stream: the side stream writes only memory it allocates, which the allocator
        # hands out again only after the compute stream is done with it (record_stream in _hand_over). The
        # stream's own device work (data.decode=gpu decodes the batch on the device) runs there too.
        with torch.cuda.stream(self._side):
            epoch, host = next(batches)
            staged = self._stage(*host)
            ready = self._side.record_event()
        return epoch, staged, ready

    def _hand_over(self, staged: tuple, ready) -> None:
        """Make the compute stream wait for the staging, and tell the allocator that the staged tensors are used
        there (they were allocated on the side stream: without it their memory could be reused too early)."""
        if ready is None:
            return
        main = torch.cuda.current_stream(self.device)
        main.wait_event(ready)
        for t in staged:
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                t.record_stream(main)
