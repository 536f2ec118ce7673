"""Checkpoints: DeepSpeed's save with our client state, made atomic and pruned, plus resume.

Layout: `<run>/checkpoints/step_XXXXXXXX/` (DeepSpeed's folder + our `meta.json`), and
`<run>/checkpoints/latest` naming the newest complete tag. `latest` is written last, through a
temporary file and a rename, so a crash mid-save leaves the previous checkpoint as `latest`.
Older tags are deleted only after the new `latest` is in place. DeepSpeed writes its shards with
torch.save to a local or shared file system path; our own files go through fsspec.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time

import fsspec
import numpy as np
import torch
import torch.distributed as dist

from pretrain.errors import UserError

TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def _fs(path: str):
    fs, root = fsspec.core.url_to_fs(path)
    return fs, root


def read_latest(ckpt_dir: str) -> str | None:
    """The newest complete tag in `ckpt_dir`, or None."""
    fs, root = _fs(ckpt_dir)
    latest = f"{root}/latest"
    if not fs.exists(latest):
        return None
    tag = fs.cat_file(latest).decode().strip()
    return tag or None


def read_meta(ckpt_dir: str, tag: str) -> dict:
    fs, root = _fs(ckpt_dir)
    path = f"{root}/{tag}/meta.json"
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt_dir}/{tag} is incomplete or unreadable ({type(e).__name__}: "
                        f"{path}); point checkpoint.resume at another checkpoint or use checkpoint.resume=never") from None


def _write_atomic(path: str, text: str) -> None:
    fs, p = _fs(path)
    tmp = f"{p}.tmp{os.getpid()}"
    with fs.open(tmp, "w") as f:
        f.write(text)
    fs.mv(tmp, p)


def rng_state() -> dict:
    """This rank's generators; of the GPUs only its own device's (a resume may see fewer GPUs)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(torch.cuda.current_device()) if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        cuda = cuda_rng_for(state.get("cuda"), device)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def cuda_rng_for(saved, device: int):
    """The saved CUDA generator state for device `device`: the one tensor a checkpoint holds, or from an
    older checkpoint's list of every visible GPU's states the device's entry (None if it had fewer)."""
    if isinstance(saved, (list, tuple)):
        return saved[device] if device < len(saved) else None
    return saved


def _gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def save(engine, ckpt_dir: str, step: int, client: dict, *, rank: int, world_size: int, keep: int) -> str:
    """Save on every rank (collective); rank 0 then publishes `latest` and prunes. Returns the tag."""
    tag = tag_of(step)
    # per-rank state (data position, RNG) gathered so any rank count can resume from it
    per_rank = _gather({"data": client.pop("data_state"), "rng": rng_state()}, world_size)
    client = dict(client, per_rank=per_rank, world_size=world_size)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client, save_latest=False)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        meta = {"tag": tag, "step": step, "world_size": world_size, "zero_stage": engine.zero_optimization_stage(),
                "epoch": client.get("epoch"), "samples_seen": client.get("samples_seen")}
        fs, root = _fs(ckpt_dir)
        with fs.open(f"{root}/{tag}/meta.json", "w") as f:
            json.dump(meta, f)
        _write_atomic(f"{ckpt_dir}/latest", tag + "\n")
        prune(ckpt_dir, keep)
    if world_size > 1:
        dist.barrier()
    return tag


def prune(ckpt_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` complete tags (never the one `latest` names), plus stale
    universal conversions of deleted tags."""
    fs, root = _fs(ckpt_dir)
    latest = read_latest(ckpt_dir)
    entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    tags = sorted(t for t in entries if TAG_RE.match(t) and t <= (latest or ""))
    doomed = [t for t in tags[:-keep] if t != latest] if keep > 0 else []
    for t in doomed:
        for name in (t, f"{t}_universal"):
            if name in entries:
                fs.rm(f"{root}/{name}", recursive=True)


def to_universal(ckpt_dir: str, tag: str, *, rank: int, timeout_s: float = 6 * 3600) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (loads on any world size) -> its tag.

    Rank 0 converts (once: a `done` marker makes it idempotent); the other ranks poll the shared file
    system for the marker rather than waiting in a collective, whose timeout a large conversion exceeds.
    """
    out_tag = f"{tag}_universal"
    out = os.path.join(ckpt_dir, out_tag)
    done, failed = os.path.join(out, "done"), os.path.join(ckpt_dir, f"{out_tag}.failed")
    if rank == 0 and not os.path.exists(done):
        if os.path.exists(failed):
            os.remove(failed)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               os.path.join(ckpt_dir, tag), "--output_folder", out, "--num_extract_workers", "1",
               "--num_merge_workers", "1", "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = ((proc.stderr or proc.stdout).strip().splitlines() or ["?"])[-1]
            msg = (f"could not convert checkpoint {ckpt_dir}/{tag} to the universal format for a new world "
                   f"size: {tail}")
            with open(failed, "w") as f:
                f.write(msg)
            raise UserError(msg)
        open(done, "w").close()
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(done):
        if os.path.exists(failed):
            raise UserError(open(failed).read().strip())
        if time.monotonic() > deadline:
            raise UserError(f"timed out waiting for rank 0 to convert {ckpt_dir}/{tag} to the universal format")
        time.sleep(1.0)
    return out_tag


def resolve_resume(resume: str, ckpt_dir: str) -> tuple[str, str] | None:
    """(checkpoint folder, tag) to resume from, or None. `resume`: auto | never | a tag folder path."""
    if resume == "never":
        return None
    if resume == "auto":
        tag = read_latest(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    path = resume.rstrip("/")
    fs, root = _fs(path)
    if fs.exists(f"{root}/latest"):  # a checkpoints/ folder
        tag = read_latest(path)
        if tag:
            return path, tag
    if fs.exists(f"{root}/meta.json"):  # a tag folder
        parent, tag = path.rsplit("/", 1) if "/" in path else (".", path)
        return parent, tag
    raise UserError(f"config key checkpoint.resume: {resume!r} is not a checkpoint folder (no latest or "
                    "meta.json there); use auto, never, or a path like RUN/checkpoints/step_00001000")


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Load module, optimizer and our client state into `engine`; returns the client state."""
    try:
        path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=True)
    except (FileNotFoundError, RuntimeError, KeyError) as e:
        raise UserError(f"could not load checkpoint {ckpt_dir}/{tag}: {str(e).splitlines()[0]}") from None
    if path is None:
        raise UserError(f"could not load checkpoint {ckpt_dir}/{tag}: DeepSpeed found nothing there")
    return client or {}


def load_client_state(ckpt_dir: str, tag: str) -> dict:
    """Our client state straight from a DeepSpeed tag folder (written by rank 0 with the module)."""
    path = os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt")
    # our own file, holding numpy RNG state next to tensors: DeepSpeed reads it the same way
    state = torch.load(path, map_location="cpu", weights_only=False)
    skip = {"module", "optimizer", "lr_scheduler", "buffer_names", "param_shapes", "frozen_param_shapes",
            "shared_params", "frozen_param_fragments", "csr_tensor_module_names", "ds_config", "ds_version"}
    return {k: v for k, v in state.items() if k not in skip}
