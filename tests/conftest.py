"""Shared test set-up: CPU DeepSpeed, a private torch-extensions cache, and small helpers."""
import os
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
