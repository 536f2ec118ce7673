"""Each launch path proven with the smallest job: pretrain.dist.setup() + a gloo all_reduce across 2 ranks.

Real daemons (SLURM controller + 2 node daemons, munge, sshd for pdsh) on loopback, from launch_fixtures.
"""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port
from launch_fixtures import ALLREDUCE_SCRIPT, base_env, parse_allreduce  # fixtures: via conftest.py

pytestmark = pytest.mark.slow
TWO = {0: (2, None, 3.0), 1: (2, None, 3.0)}


def _check(ranks: dict, launcher: str):
    assert ranks == {r: (w, launcher, s) for r, (w, _, s) in TWO.items()}, ranks


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("allreduce") / "allreduce.py"
    p.write_text(ALLREDUCE_SCRIPT)
    p.parent.chmod(0o755)
    return p


def test_slurm_srun_two_nodes(slurm_cluster, script):
    t0 = time.monotonic()
    r = slurm_cluster.run("srun", "-N2", "--ntasks-per-node=1", "--time=5", sys.executable, str(script), timeout=180)
    _check(parse_allreduce(r.stdout), "slurm")
    print(f"srun 2 nodes: {time.monotonic() - t0:.1f}s")


def test_slurm_batch_script_without_srun_is_a_clear_error(slurm_cluster, script, tmp_path):
    tmp_path.chmod(0o755)
    job = tmp_path / "job.sh"
    job.write_text(f"#!/bin/bash\nexec {sys.executable} {script}\n")
    out = tmp_path / "out.txt"
    slurm_cluster.run("sbatch", "--wait", "-N2", "--ntasks-per-node=1", f"--output={out}", str(job),
                      timeout=180, check=False)
    text = out.read_text()
    assert "not an srun task" in text and "srun" in text, text


def test_deepspeed_hostfile_two_hosts(ssh_loopback, script, tmp_path):
    tmp_path.chmod(0o755)
    (tmp_path / "hostfile").write_text("n1 slots=1\nn2 slots=1\n")
    env = base_env()
    (tmp_path / ".deepspeed_env").write_text(
        "".join(f"{k}={env[k]}\n" for k in ("PATH", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "PYTHONPATH", "OMP_NUM_THREADS")))
    t0 = time.monotonic()
    r = subprocess.run(["deepspeed", "--hostfile", str(tmp_path / "hostfile"), "--master_addr", "127.0.0.1",
                        "--master_port", str(free_port()), "--no_local_rank", str(script)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    _check(parse_allreduce(r.stdout), "deepspeed")
    print(f"deepspeed hostfile 2 hosts: {time.monotonic() - t0:.1f}s")


def test_torchrun_two_nodes(script):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={n}", "--master_addr=127.0.0.1", f"--master_port={port}", str(script)],
                              cwd=REPO, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    _check(parse_allreduce(outs[0][0] + outs[1][0]), "torchrun")
