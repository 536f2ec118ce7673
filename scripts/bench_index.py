"""Start-up at scale: what reading a big `<split>.json` shard index costs one rank, and what handing it
to the other ranks costs instead (docs/data.md, "Start-up at scale").

Writes an index in the format `vit-pretrain shards` writes (json, indent=1: shards, counts, bytes,
1000 class names) for `--shards` shards, then times `read_index` on it from a local file, from fsspec's
`memory://` and, when moto is installed, from a local S3 server (moto, in this process: loopback, no
network). Also: the index's in-memory size, the pickled payload one broadcast carries, and (`--broadcast`)
one `broadcast_object_list` of it between 2 processes on a gloo group over loopback.
Prints a markdown table; each time is the median of `--repeats` reads.

    python scripts/bench_index.py --shards 100000 --broadcast
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import random
import socket
import statistics
import tempfile
import time
import tracemalloc

import fsspec

from pretrain.data.index import read_index


def make_index(n: int, classes: int) -> bytes:
    """A `<split>.json` as the writer makes it: 1000-odd samples and ~100 MB per shard."""
    rng = random.Random(0)
    meta = {"split": "train", "shards": [f"train-{i:06d}.tar" for i in range(n)],
            "counts": [rng.randint(900, 1100) for _ in range(n)], "num_samples": 0,
            "bytes": [rng.randint(90_000_000, 110_000_000) for _ in range(n)],
            "classes": [f"n{i:08d}" for i in range(classes)],
            "made_by": {"source": "bench", "samples_per_shard": 1000, "created": "2026-12-01T00:00:00+00:00"}}
    meta["num_samples"] = sum(meta["counts"])
    return json.dumps(meta, indent=1).encode()


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_mb(url: str) -> tuple[float, float]:
    """(peak MB while reading, MB the ShardIndex keeps), by tracemalloc (a separate, untimed read)."""
    tracemalloc.start()
    idx = read_index(url)
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del idx
    return peak / 2**20, kept / 2**20


def s3_url(data: bytes):
    """The index on a moto S3 server in this process; -> (url, stop) or None without moto/s3fs."""
    try:
        import boto3
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="bench")
    client.put_object(Bucket="bench", Key="idx/train.json", Body=data)
    s3fs.S3FileSystem.clear_instance_cache()
    return "s3://bench/idx/train.json", server.stop


def _broadcast_worker(rank: int, port: int, url: str, repeats: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    idx = read_index(url) if rank == 0 else None
    times = []
    for _ in range(repeats):
        box = [idx if rank == 0 else None]
        dist.barrier()
        t0 = time.perf_counter()
        dist.broadcast_object_list(box, src=0)
        times.append(time.perf_counter() - t0)
    if rank == 1:
        out.put((statistics.median(times), len(box[0].shards)))
    dist.destroy_process_group()


def broadcast_s(url: str, repeats: int) -> float:
    """Median seconds of one broadcast_object_list of the index, rank 0 -> rank 1 (gloo, loopback),
    measured on the receiver: pickling, 2 sends (size, bytes), unpickling."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_broadcast_worker, args=(r, port, url, repeats, out)) for r in range(2)]
    for p in procs:
        p.start()
    took, n = out.get(timeout=300)
    for p in procs:
        p.join(60)
    assert n == len(read_index(url).shards)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5, help="reads per row (the median is printed)")
    ap.add_argument("--no-s3", action="store_true", help="skip the moto S3 row")
    ap.add_argument("--broadcast", action="store_true", help="also time a 2-process gloo broadcast")
    args = ap.parse_args()

    data = make_index(args.shards, args.classes)
    folder = tempfile.mkdtemp(prefix="bench-index-")
    local = f"{folder}/train.json"
    with open(local, "wb") as f:
        f.write(data)
    with fsspec.open("memory://bench-index/train.json", "wb") as f:
        f.write(data)
    urls = {"local file": local, "fsspec memory://": "memory://bench-index/train.json"}
    stop = None
    got = None if args.no_s3 else s3_url(data)
    if got:
        urls["S3 (moto, loopback)"], stop = got

    idx = read_index(local)
    payload = pickle.dumps([idx])
    parse = median_s(lambda: json.loads(data), args.repeats)
    pickling = median_s(lambda: pickle.loads(pickle.dumps([idx])), args.repeats)
    print(f"{args.shards:,} shards, {args.classes} classes; JSON {len(data) / 2**20:.1f} MiB; "
          f"one load: {os.getloadavg()[0]:.2f}")
    print()
    print("| source | read_index ms | of which json.loads ms | peak MB while reading | MB kept |")
    print("|---|---|---|---|---|")
    try:
        for name, url in urls.items():
            read_index(url)  # warm: imports, s3fs's session
            took = median_s(lambda: read_index(url), args.repeats)
            peak, kept = memory_mb(url)
            print(f"| {name} | {took * 1e3:.0f} | {parse * 1e3:.0f} | {peak:.0f} | {kept:.0f} |")
    finally:
        if stop:
            stop()
    print()
    print("| broadcast payload | MiB | ms |")
    print("|---|---|---|")
    print(f"| pickle + unpickle of the ShardIndex (what broadcast_object_list adds) | {len(payload) / 2**20:.1f} | "
          f"{pickling * 1e3:.0f} |")
    if args.broadcast:
        took = broadcast_s(local, args.repeats)
        print(f"| broadcast_object_list, 2 processes, gloo over loopback (receiver's time) | "
              f"{len(payload) / 2**20:.1f} | {took * 1e3:.0f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
