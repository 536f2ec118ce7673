"""One rank works, every rank has the result: `broadcast_from_rank0` runs a function on rank 0 only and
hands its result, or its error, to the others in one broadcast on the CPU group (`cpu_group`).

For start-up reads that every rank would otherwise make at the same second: thousands of ranks each
fetching a 100k-shard index (4 MiB) from one object store (docs/data.md, "Start-up at scale").
"""
from __future__ import annotations

from typing import Callable, TypeVar

from pretrain.errors import UserError, first_line

T = TypeVar("T")

_cpu_group: tuple | None = None
"""(the default group, its gloo twin): made once per process group, kept until that group is replaced."""


def cpu_group():
    """A gloo group of every rank, for objects and flags that live on the CPU (a default nccl group would
    copy them to the device and back). None, which torch reads as the default group, when that is gloo
    already. Made on the first call: every rank must make that call at the same point, as for any group."""
    import torch.distributed as dist

    global _cpu_group
    if dist.get_backend() == "gloo":
        return None
    if _cpu_group is None or _cpu_group[0] is not dist.group.WORLD:
        _cpu_group = (dist.group.WORLD, dist.new_group(backend="gloo"))
    return _cpu_group[1]


def broadcast_from_rank0(fn: Callable[[], T]) -> T:
    """fn() run on rank 0 only; every rank returns its result, received in one `broadcast_object_list`
    on `cpu_group()`. An error on rank 0 travels in the same broadcast, so no rank is left waiting in the
    collective: a UserError is raised on every rank with rank 0's message; any other error is re-raised on
    rank 0 and named in a RuntimeError elsewhere. One process (no process group, a world of 1) calls fn.
    fn must finish within the group's collective timeout: the other ranks wait for it in the broadcast."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    group = cpu_group()  # made by every rank before rank 0 starts: the others wait in the broadcast alone
    box: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            failure, box[0] = e, ("user", str(e))
        except Exception as e:  # noqa: BLE001  told to the peers, then raised here
            failure, box[0] = e, ("error", f"{type(e).__name__}: {first_line(e)}")
    dist.broadcast_object_list(box, src=0, group=group)
    if failure is not None:
        raise failure
    kind, value = box[0]
    if kind == "user":
        raise UserError(value)
    if kind == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value
