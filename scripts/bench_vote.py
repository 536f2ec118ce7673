"""Time the stop vote (pretrain/engine/stopping.py) on gloo over loopback: a blocking all-reduce of one int32
per step against the background vote (started after a step, waited on the next), around a stand-in step.

    python scripts/bench_vote.py --procs 2 4 8 --steps 200 --step-ms 5
prints one row per process count: ms per step spent in the vote, blocking and in the background."""
from __future__ import annotations

import argparse
import os
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, steps: int, step_ms: float, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from pretrain.engine.stopping import StopVote

    flag, spent = threading.Event(), {}
    for name in ("blocking", "background"):
        dist.barrier()
        vote, total = StopVote(flag, 1, world), 0.0
        for s in range(1, steps + 1):
            time.sleep(step_ms / 1e3)  # the step: the host waits on the device (sleeps: fair on shared cores)
            t0 = time.perf_counter()
            if name == "blocking":
                v = torch.tensor([int(flag.is_set())], dtype=torch.int32)
                dist.all_reduce(v, op=dist.ReduceOp.MAX)
                bool(v.item())
            else:
                vote(s)
            total += time.perf_counter() - t0
        vote.close()
        spent[name] = total / steps * 1e3
    if rank == 0:
        out.put(spent)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--step-ms", type=float, default=5.0, help="host time of the stand-in step")
    a = p.parse_args()
    from pretrain.dist import free_port

    print("| processes | blocking ms/step | background ms/step |\n|---|---|---|")
    ctx = mp.get_context("spawn")
    for n in a.procs:
        out = ctx.Queue()
        mp.start_processes(_worker, args=(n, free_port(), a.steps, a.step_ms, out), nprocs=n, start_method="spawn")
        r = out.get()
        print(f"| {n} | {r['blocking']:.3f} | {r['background']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
