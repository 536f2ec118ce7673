"""Checkpoints: DeepSpeed's save with our client state, made atomic and pruned, plus the resume policy.

Layout: `<run>/checkpoints/step_XXXXXXXX/` (DeepSpeed's folder + our `meta.json`), and
`<run>/checkpoints/latest` naming the newest complete tag. A save writes into a fresh folder
`step_XXXXXXXX.tmp-<nonce>` (the nonce is rank 0's, broadcast), syncs it, renames it into place (a
stale `step_XXXXXXXX` of an earlier attempt is moved aside first, so no shard of another run or world
size survives) and only then publishes `latest`, through a temporary file and a rename: a crash at any
point leaves the previous checkpoint as `latest`. Older tags are deleted only after the new `latest` is
in place. Each checkpoint's meta.json holds a unique `uid`; a universal conversion records the uid it
came from. DeepSpeed writes its shards with torch.save to a local or shared file system path; our own
files go through fsspec.

Resume (`resume_points`, `load_resume`): `checkpoint.resume=auto` tries the newest complete checkpoint
and falls back, with a warning naming the file and the reason, to the previous complete one; an
explicit path must load or the run stops with that message.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import fsspec
import torch
import torch.distributed as dist

from pretrain.engine.metrics import Console
from pretrain.engine.trust import check_torch_file, check_torch_files
from pretrain.errors import UserError, first_line
from pretrain.fs import is_local

TAG_RE = re.compile(r"^step_(\d{8})$")
ASIDE_RE = re.compile(r"^step_\d{8}\.(tmp|old)-[0-9a-f]+$")
"""A save's temporary folder, or a stale folder moved aside: leftovers of a crash, pruned."""


def tag_of(step: int) -> str:
    return f"step_{step:08d}"



def read_latest(ckpt_dir: str) -> str | None:
    """The newest complete tag in `ckpt_dir`, or None."""
    fs, root = fsspec.core.url_to_fs(ckpt_dir)
    latest = f"{root}/latest"
    if not fs.exists(latest):
        return None
    tag = fs.cat_file(latest).decode().strip()
    return tag or None


def read_meta(ckpt_dir: str, tag: str) -> dict:
    fs, root = fsspec.core.url_to_fs(ckpt_dir)
    path = f"{root}/{tag}/meta.json"
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt_dir}/{tag} is incomplete or unreadable ({type(e).__name__}: "
                        f"{path}); point checkpoint.resume at another checkpoint or use checkpoint.resume=never") from None


def _write_atomic(path: str, text: str) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    tmp = f"{p}.tmp{os.getpid()}"
    with fs.open(tmp, "w") as f:
        f.write(text)
    fs.mv(tmp, p)


def _gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _nonce(world_size: int) -> str:
    """One random name part agreed by every rank (rank 0's, broadcast)."""
    nonce = [secrets.token_hex(4)]
    if world_size > 1:
        dist.broadcast_object_list(nonce, src=0)
    return nonce[0]


def _fsync(fs, *paths: str) -> None:
    """Flush local files or folders to disk (object stores need nothing: a PUT is whole or absent).
    fsspec has no fsync, hence os."""
    if not is_local(fs):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(fs, path: str) -> None:
    if is_local(fs):
        walk = list(os.walk(path))
        _fsync(fs, *(os.path.join(d, n) for d, _, names in walk for n in names), *(d for d, _, _ in walk))


def _free_space(path: str) -> str:
    import shutil

    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free there"
    except OSError:  # not a local path
        return "free space unknown"


def save(engine, ckpt_dir: str, step: int, client: dict, *, rank: int, world_size: int, keep: int) -> str:
    """Save on every rank (collective); rank 0 then publishes it and prunes. Returns the tag."""
    tag = tag_of(step)
    nonce = _nonce(world_size)
    tmp_tag = f"{tag}.tmp-{nonce}"
    # every rank's data position, gathered so any rank count can resume from it (no generator state: every
    # draw is seeded from where the run is, pretrain/rng.py; checkpoints that hold one load, it is unused)
    per_rank = _gather({"data": client.pop("data_state")}, world_size)
    client = dict(client, per_rank=per_rank, world_size=world_size)
    try:
        engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state=client, save_latest=False)
    except Exception as e:  # torch's zip writer says "unexpected pos" for a full disk: name the folder and the room
        raise RuntimeError(f"writing checkpoint {ckpt_dir}/{tmp_tag} failed ({_free_space(ckpt_dir)}): "
                           f"{type(e).__name__}: {first_line(e)}") from e
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        meta = {"tag": tag, "uid": f"{tag}-{nonce}", "step": step, "world_size": world_size,
                "zero_stage": engine.zero_optimization_stage(), "epoch": client.get("epoch"),
                "samples_seen": client.get("samples_seen")}
        fs, root = fsspec.core.url_to_fs(ckpt_dir)
        with fs.open(f"{root}/{tmp_tag}/meta.json", "w") as f:
            json.dump(meta, f)
        _fsync_tree(fs, f"{root}/{tmp_tag}")
        if fs.exists(f"{root}/{tag}"):  # a stale folder (crash mid-save, rollback): never mixed with ours
            fs.mv(f"{root}/{tag}", f"{root}/{tag}.old-{nonce}", recursive=True)
        fs.mv(f"{root}/{tmp_tag}", f"{root}/{tag}", recursive=True)
        _fsync(fs, root)  # the rename is on disk before `latest` names it
        _write_atomic(f"{ckpt_dir}/latest", tag + "\n")
        prune(ckpt_dir, keep)
    if world_size > 1:
        dist.barrier()
    return tag


def prune(ckpt_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` complete tags (never the one `latest` names), their universal
    conversions, and the leftovers of crashed saves (`*.tmp-*`, `*.old-*`). Rank 0, between saves."""
    fs, root = fsspec.core.url_to_fs(ckpt_dir)
    latest = read_latest(ckpt_dir)
    entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    tags = sorted(t for t in entries if TAG_RE.match(t) and t <= (latest or ""))
    doomed = [t for t in tags[:-keep] if t != latest] if keep > 0 else []
    doomed += [f"{t}_universal" for t in doomed] + [e for e in entries if ASIDE_RE.match(e)]
    for name in doomed:
        if name in entries:
            fs.rm(f"{root}/{name}", recursive=True)


def to_universal(ckpt_dir: str, tag: str, *, rank: int, timeout_s: float = 6 * 3600) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (loads on any world size) -> its tag.

    Rank 0 converts once per source checkpoint: its `done` marker holds the source's uid, so a
    conversion left over from an earlier checkpoint of the same tag is redone, never reused. The other
    ranks poll the shared file system for the marker rather than waiting in a collective, whose timeout
    a large conversion exceeds.
    """
    uid = read_meta(ckpt_dir, tag).get("uid", tag)
    out_tag = f"{tag}_universal"
    out = os.path.join(ckpt_dir, out_tag)
    done, failed = os.path.join(out, "done"), os.path.join(ckpt_dir, f"{out_tag}.failed")

    def converted() -> bool:
        try:
            with open(done) as f:
                return f.read().strip() == uid
        except FileNotFoundError:
            return False

    if rank == 0 and not converted():
        if os.path.exists(failed):
            os.remove(failed)
        if os.path.exists(out):  # another checkpoint's conversion, or a half-written one
            import shutil

            shutil.rmtree(out)
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
        _write_atomic(done, uid + "\n")
    deadline = time.monotonic() + timeout_s
    while not converted():
        if os.path.exists(failed):
            raise UserError(open(failed).read().strip())
        if time.monotonic() > deadline:
            raise UserError(f"timed out waiting for rank 0 to convert {ckpt_dir}/{tag} to the universal format")
        time.sleep(1.0)
    return out_tag


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint to resume from: `folder` (a checkpoints/ folder), `tag`, its meta.json."""
    folder: str
    tag: str
    meta: dict

    @property
    def path(self) -> str:
        return f"{self.folder}/{self.tag}"

    def needs_universal(self, world_size: int) -> bool:
        """ZeRO partitions depend on the world size: on another one DeepSpeed's universal format loads."""
        return self.meta["world_size"] != world_size and self.meta["zero_stage"] >= 1


Warn = Callable[[str], None]
"""Where resume's warnings go: the trainer's rank-0 console (default: stderr)."""


def _complete(ckpt_dir: str, warn: Warn) -> list[ResumePoint]:
    """The folder's complete checkpoints, newest first: tags up to `latest` (all tags when `latest` is
    missing or unreadable: a tag folder exists only once complete) whose meta.json reads."""
    fs, root = fsspec.core.url_to_fs(ckpt_dir)
    if not fs.exists(root):
        return []
    try:
        latest = read_latest(ckpt_dir)
    except (OSError, UnicodeDecodeError):
        latest = None
    entries = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    if latest is not None and not TAG_RE.match(latest):
        warn(f"{ckpt_dir}/latest names {latest[:40]!r}, not a checkpoint tag; looking at every tag")
        latest = None
    points = []
    for tag in sorted((t for t in entries if TAG_RE.match(t) and (latest is None or t <= latest)), reverse=True):
        try:
            points.append(ResumePoint(ckpt_dir, tag, read_meta(ckpt_dir, tag)))
        except UserError as e:
            warn(f"skipping {e}")
    return points


def resume_points(resume: str, ckpt_dir: str, *, warn: Warn = Console(True).warn) -> tuple[list[ResumePoint], bool]:
    """(checkpoints to try, newest first; whether to fall back past one that fails to load).

    `resume`: `never`; `auto` (this run's complete checkpoints: fall back to older ones); or a path to a
    checkpoints/ folder (its `latest`) or a tag folder: that one checkpoint, no fallback."""
    if resume == "never":
        return [], False
    if resume == "auto":
        return _complete(ckpt_dir, warn), True
    path = resume.rstrip("/")
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(f"{root}/latest"):  # a checkpoints/ folder
        tag = read_latest(path)
        if tag:
            return [ResumePoint(path, tag, read_meta(path, tag))], False
    if fs.exists(f"{root}/meta.json"):  # a tag folder
        parent, tag = path.rsplit("/", 1) if "/" in path else (".", path)
        return [ResumePoint(parent, tag, read_meta(parent, tag))], False
    raise UserError(f"config key checkpoint.resume: {resume!r} is not a checkpoint folder (no latest or "
                    "meta.json there); use auto, never, or a path like RUN/checkpoints/step_00001000")


def _unreadable_file(folder: str) -> str | None:
    """The first torch file of a local tag folder that is not a whole zip archive (truncated, foreign)."""
    import zipfile

    if not os.path.isdir(folder):
        return None
    for name in sorted(os.listdir(folder)):
        if name.endswith(".pt") and not zipfile.is_zipfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Load module, optimizer and our client state into `engine`; returns the client state.
    A failure is a UserError naming the checkpoint, the file when one is unreadable, and the reason."""
    check_torch_files(os.path.join(ckpt_dir, tag), f"could not load checkpoint {ckpt_dir}/{tag}")
    try:
        path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_module_strict=True)
    except Exception as e:  # noqa: BLE001  torch.load, pickle and DeepSpeed raise many types for a bad file
        bad = getattr(e, "filename", None) or _unreadable_file(os.path.join(ckpt_dir, tag))
        where = f"{bad} is unreadable: " if bad else ""
        what = first_line(e)
        if "Error(s) in loading state_dict" in what:  # the reason is on the next lines: keep the first
            detail = " ".join(ln.strip() for ln in str(e).strip().splitlines()[1:2])
            what = (f"{what} {detail[:300]}{'...' if len(detail) > 300 else ''}; it holds another model than "
                    "this config's (compare model.* with the config.yaml of its run)")
        raise UserError(f"could not load checkpoint {ckpt_dir}/{tag}: {where}{type(e).__name__}: {what}") from None
    if path is None:
        raise UserError(f"could not load checkpoint {ckpt_dir}/{tag}: DeepSpeed found nothing there")
    return client or {}



def load_resume(engine, points: list[ResumePoint], fallback: bool, *, rank: int, world_size: int,
                universal: bool, warn: Warn = Console(True).warn) -> tuple[ResumePoint, str, dict]:
    """Load the first of `points` that every rank can load -> (point, loaded tag, client state).

    `universal`: the engine was built to load DeepSpeed's universal format (a world-size change of
    points[0]); a point that needs the other format is skipped. Every rank must load the same
    checkpoint, so the ranks agree on each attempt (a collective at start-up, never on an error path).
    """
    for i, p in enumerate(points):
        error = None
        if p.needs_universal(world_size) != universal:
            error = (f"checkpoint {p.path} was written on {p.meta['world_size']} ranks and needs another "
                     "loading mode than the newest one")
        else:
            try:
                if universal:  # the conversion unpickles the source files: checked first, on every rank
                    check_torch_files(os.path.join(p.folder, p.tag), f"could not load checkpoint {p.path}")
                tag = to_universal(p.folder, p.tag, rank=rank) if universal else p.tag
                client = load(engine, p.folder, tag)
                if not client and universal:  # universal output may lack the client state
                    client = load_client_state(p.folder, p.tag)
            except UserError as e:
                error = str(e)
        errors = [e for e in _gather(error, world_size) if e]
        if not errors:
            return p, tag, client
        if not fallback:
            raise UserError(errors[0])
        if i == len(points) - 1:
            raise UserError(f"{errors[0]}; no older complete checkpoint to fall back to: fix or move it, "
                            "or start afresh with checkpoint.resume=never and a new run.name")
        warn(f"{errors[0]}; falling back to {points[i + 1].path}")
    raise AssertionError("unreachable: load_resume needs at least one point")


def load_client_state(ckpt_dir: str, tag: str) -> dict:
    """Our client state straight from a DeepSpeed tag folder (written by rank 0 with the module)."""
    path = os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt")
    # DeepSpeed's metadata next to tensors: read as DeepSpeed reads it, once checked to call nothing else
    check_torch_file(path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    skip = {"module", "optimizer", "lr_scheduler", "buffer_names", "param_shapes", "frozen_param_shapes",
            "shared_params", "frozen_param_fragments", "csr_tensor_module_names", "ds_config", "ds_version"}
    return {k: v for k, v in state.items() if k not in skip}
