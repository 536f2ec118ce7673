"""Shared test set-up: CPU DeepSpeed, a private torch-extensions cache, and small helpers."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import pretrain._compat  # noqa: F401  the torchvision fix must run before any test module imports timm

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run `python -m pretrain ARGS...` as a user would; returns the completed process."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_job(cmd: list[str], *, timeout: float, env=None, cwd=None) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) for a multi-process job (torchrun and its workers).
    On a timeout every process of the job prints its threads' Python stacks (faulthandler, on SIGABRT) and
    the test fails with them: a hang says where each rank stood, in CI's log too."""
    full_env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    with subprocess.Popen(cmd, cwd=cwd or REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [*_descendants(proc.pid)[::-1], proc.pid]:  # the workers first, then the launcher
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGABRT)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            raise AssertionError(f"{' '.join(map(str, cmd[:6]))} ...: still running after {timeout:.0f} s; "
                                 f"each process's stacks (SIGABRT):\n{err[-20000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before their children (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


def metrics_rows(run_dir) -> dict:
    """{step: last metrics.jsonl row with a loss} (a resumed run appends; redone steps overwrite)."""
    import json

    rows = {}
    for line in open(Path(run_dir) / "metrics.jsonl"):
        r = json.loads(line)
        if "loss" in r:
            rows[r["step"]] = r
    return rows


@pytest.fixture
def cli():
    return run_cli


# Session-wide launch infrastructure (SLURM cluster, sshd for pdsh) shared by tests/test_launch*.py:
# defined once here so every module gets the same daemons (see tests/launch_fixtures.py).
from launch_fixtures import slurm_cluster, ssh_loopback  # noqa: E402,F401
