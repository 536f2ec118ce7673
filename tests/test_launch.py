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


@pytest.fixture
def two_netns():
    """Two network namespaces joined by a veth pair, 10.77.0.1 (vA) and 10.77.0.2 (vB): two "nodes" whose
    only shared network is that link. The host name resolves to loopback in each, as on hosts whose
    /etc/hosts maps it to 127.0.1.1. Removed afterwards."""
    import os
    import shutil
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 to make network namespaces")
    names = [f"vitp{os.getpid()}a", f"vitp{os.getpid()}b"]
    steps = [["ip", "netns", "add", names[0]], ["ip", "netns", "add", names[1]],
             ["ip", "link", "add", "vA", "netns", names[0], "type", "veth", "peer", "name", "vB", "netns", names[1]],
             ["ip", "-n", names[0], "addr", "add", "10.77.0.1/24", "dev", "vA"],
             ["ip", "-n", names[1], "addr", "add", "10.77.0.2/24", "dev", "vB"]]
    for ns, dev in zip(names, ("vA", "vB")):
        steps += [["ip", "-n", ns, "link", "set", "lo", "up"], ["ip", "-n", ns, "link", "set", dev, "up"]]
    try:
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot make network namespaces here: {' '.join(cmd)}: {r.stderr.strip()}")
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _run_in_netns(names, script, port, **extra):
    procs = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(script)], cwd=REPO,
                              env=base_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                                           MASTER_ADDR="10.77.0.1", MASTER_PORT=str(port), **extra),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, ns in enumerate(names)]
    outs = [p.communicate(timeout=240) for p in procs]
    return [p.returncode for p in procs], outs


def test_gloo_interface_is_derived_from_the_route_to_the_master(two_netns, script):
    """Each rank's host name resolves to its own loopback: gloo's default address is unreachable from the
    other namespace. pretrain.dist derives vA / vB from the route to MASTER_ADDR and the all_reduce works;
    a user's GLOO_SOCKET_IFNAME wins (lo: the job fails, within the collective timeout, with the hint)."""
    rcs, outs = _run_in_netns(two_netns, script, free_port())
    assert rcs == [0, 0], [e[-2000:] for _, e in outs]
    _check(parse_allreduce(outs[0][0] + outs[1][0]), "torchrun")

    rcs, outs = _run_in_netns(two_netns, script, free_port(), GLOO_SOCKET_IFNAME="lo",
                              VIT_PRETRAIN_COLLECTIVE_TIMEOUT="20")
    assert rcs != [0, 0] and "GLOO_SOCKET_IFNAME (now lo)" in outs[0][1] + outs[1][1], [e[-1500:] for _, e in outs]
