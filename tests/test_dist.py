"""pretrain.dist: the environment resolver for every launcher, half-set environments, and a real rendezvous."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.dist import DistEnv, resolve
from pretrain.errors import UserError
from conftest import REPO, free_port, run_job
from launch_fixtures import ALLREDUCE_SCRIPT, base_env, parse_allreduce


def test_single_process():
    d = resolve({})
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (0, 1, 0, "single")
    assert d.rank == 0 and 1 <= d.master_port <= 65535


def test_single_process_keeps_given_port():
    assert resolve({"MASTER_PORT": "31000"}).master_port == 31000


def test_torchrun():
    # the variables torchrun (torch elastic) gives each worker
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "MASTER_ADDR": "n1", "MASTER_PORT": "29600", "TORCHELASTIC_RUN_ID": "x"}
    assert resolve(env) == DistEnv(3, 4, 1, 2, "n1", 29600, "torchrun")


def test_deepspeed_launcher():
    # deepspeed/launcher/launch.py: CROSS_RANK/CROSS_SIZE/LOCAL_SIZE besides the torch names
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_SIZE": "1", "CROSS_RANK": "1",
           "CROSS_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29700"}
    assert resolve(env) == DistEnv(1, 2, 0, 1, "127.0.0.1", 29700, "deepspeed")


def test_slurm_srun_task():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[07-10]", "PATH": "/nonexistent"}
    d = resolve(env)  # no scontrol on PATH: the node list is parsed by hand
    assert d == DistEnv(5, 8, 1, 2, "gpu07", 29500 + 1234, "slurm")


def test_slurm_nodelist_forms():
    base = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "PATH": "/nonexistent"}
    assert resolve({**base, "SLURM_JOB_NODELIST": "n1,n2"}).master_addr == "n1"
    assert resolve({**base, "SLURM_JOB_NODELIST": "a-[3,5-6],b1"}).master_addr == "a-3"
    assert resolve({**base, "SLURM_JOB_NODELIST": "x", "MASTER_ADDR": "10.0.0.9"}).master_addr == "10.0.0.9"


def test_slurm_uneven_tasks_per_node():
    env = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "2,1", "SLURM_JOB_NODELIST": "n1,n2", "PATH": "/x"}
    assert resolve(env).local_world_size == 1


def test_torchrun_inside_srun_wins_over_slurm():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "n1,n2",
           "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29501"}
    d = resolve(env)
    assert (d.launcher, d.rank, d.world_size) == ("torchrun", 1, 4)


@pytest.mark.parametrize("env, words", [
    ({"RANK": "0"}, ["RANK=0", "WORLD_SIZE is not"]),
    ({"WORLD_SIZE": "2"}, ["WORLD_SIZE=2", "RANK is not"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "1"}, ["MASTER_ADDR"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, ["MASTER_PORT"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "2"}, ["LOCAL_RANK"]),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "2"}, ["rank 2", "world size 2"]),
    ({"RANK": "x", "WORLD_SIZE": "2"}, ["RANK='x'", "not an integer"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, ["MASTER_PORT=70000"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
      "MASTER_PORT": "2"}, ["local rank 2"]),
    ({"LOCAL_RANK": "1"}, ["LOCAL_RANK=1"]),
    ({"SLURM_PROCID": "0"}, ["SLURM_NTASKS is missing"]),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1,n2"}, ["batch script", "srun"]),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}, ["SLURM_JOB_NODELIST"]),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "3", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "n1"}, ["rank 3"]),
])
def test_half_set_environment_is_a_clear_error(env, words):
    with pytest.raises(UserError) as e:
        resolve({"PATH": "/nonexistent", **env})
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_salloc_shell_of_one_task_is_single():
    assert resolve({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}).launcher == "single"
    with pytest.raises(UserError, match="SLURM_PROCID is missing"):
        resolve({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"})


def test_world_of_one_needs_no_master():
    d = resolve({"RANK": "0", "WORLD_SIZE": "1"})
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "torchrun")


def _script(tmp_path: Path) -> Path:
    p = tmp_path / "allreduce.py"
    p.write_text(ALLREDUCE_SCRIPT)
    return p


@pytest.mark.slow
def test_setup_single_process(tmp_path):
    out = subprocess.run([sys.executable, str(_script(tmp_path))], env=base_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert parse_allreduce(out.stdout) == {0: (1, "single", 1.0)}


@pytest.mark.slow
def test_torchrun_two_processes_all_reduce(tmp_path):
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(_script(tmp_path))]
    out = run_job(cmd, env=base_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert parse_allreduce(out.stdout) == {0: (2, "torchrun", 3.0), 1: (2, "torchrun", 3.0)}
    print(f"torchrun 2 processes: {time.monotonic() - t0:.1f}s")


def _lone_rank(tmp_path, rank: int):
    """Rank `rank` of 2 started alone with a 3 s rendezvous timeout: -> (port, completed process)."""
    port = free_port()
    env = base_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   VIT_PRETRAIN_RDZV_TIMEOUT="3")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(_script(tmp_path))], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    took = time.monotonic() - t0
    print(f"rank {rank} of 2 alone: exit {out.returncode} after {took:.1f}s: {out.stderr.strip().splitlines()[-1:]}")
    assert took < 60  # bounded: an error, not a hang
    assert out.returncode != 0
    return port, out


@pytest.mark.slow
def test_rendezvous_timeout_names_missing_rank(tmp_path):
    # rank 0 of 2 alone: bounded wait, then an error naming address, port and the missing rank
    port, out = _lone_rank(tmp_path, 0)
    assert f"127.0.0.1:{port}" in out.stderr and "missing ranks: 1" in out.stderr and "rank 0" in out.stderr, \
        out.stderr[-2000:]


@pytest.mark.slow
def test_unreachable_master_names_address_port_rank(tmp_path):
    port, out = _lone_rank(tmp_path, 1)  # nobody listens on the master's port
    assert f"127.0.0.1:{port}" in out.stderr and "rank 1" in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_unresolvable_master_fails_fast(tmp_path):
    env = base_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="no-such-host.invalid",
                   MASTER_PORT="29999", VIT_PRETRAIN_RDZV_TIMEOUT="300")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(_script(tmp_path))], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert time.monotonic() - t0 < 60
    assert out.returncode != 0 and "'no-such-host.invalid' does not resolve" in out.stderr, out.stderr[-2000:]


WATCHDOG_AT_EXIT = """
import datetime, sys, time
import torch.distributed as dist
from pretrain.dist import DistEnv, watchdog

port = int(sys.argv[1])
server = dist.TCPStore("127.0.0.1", port, None, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
server.set("t/health/done/1", "1")  # the neighbour has finished: the thread only beats


class Busy(watchdog.Watchdog):  # beats without pause: the thread is nearly always inside a store call
    interval = property(lambda self: 0.0, lambda self, value: None)


wd = Busy(DistEnv(0, 2, 0, 2, "127.0.0.1", port, "torchrun"), "t", 30.0, hosts_store=True)
time.sleep(0.3)
wd.stop()
print("beats", server.add("t/health/beat/0", 0))
"""


def test_watchdog_stopped_before_exit_never_aborts_the_process(tmp_path):
    # A daemon thread still inside a C++ store call when the interpreter exits aborts the process
    # (`terminate called without an active exception`): a run that succeeded exited with SIGABRT.
    script = tmp_path / "watchdog_at_exit.py"
    script.write_text(WATCHDOG_AT_EXIT)
    for _ in range(5):
        out = subprocess.run([sys.executable, str(script), str(free_port())], env=base_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "terminate called" not in out.stderr, (out.returncode, out.stderr[-2000:])
        assert int(out.stdout.split()[-1]) > 10  # the thread did beat many times before it was stopped
