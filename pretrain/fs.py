"""File-system helpers over fsspec, for the few places that need a real local path (DeepSpeed and
zero_to_fp32 read and write with os.path; fsync has no fsspec form)."""
from __future__ import annotations

import contextlib
import os
import tempfile

import fsspec


def is_local(fs) -> bool:
    """Whether an fsspec file system is the local disk (paths are os paths; folders exist)."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


@contextlib.contextmanager
def local_copy(url: str):
    """A local path for the folder `url`: itself when local, else a temporary copy."""
    fs, path = fsspec.core.url_to_fs(url)
    if is_local(fs):
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        yield tmp


@contextlib.contextmanager
def local_out(url: str):
    """A local folder to write into, uploaded to the folder `url` afterwards when `url` is remote."""
    fs, path = fsspec.core.url_to_fs(url)
    if is_local(fs):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        fs.put(tmp.rstrip("/") + "/", path, recursive=True)
