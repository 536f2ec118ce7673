"""Real launch infrastructure on one machine: a SLURM controller with two node daemons (n1, n2), munge,
and sshd for pdsh, all on loopback with their configuration in a temp folder, stopped by pid afterwards.
Each SLURM node has 4 CPUs and 2 GPUs as a generic resource (fake devices: SLURM allocates and binds them,
no CUDA behind them).

Recipes: ../shared/LAUNCH-TESTING.md. Needs root (apt, /etc/hosts, daemons); elsewhere the fixtures skip
with the reason. tests/conftest.py imports the fixtures, so one cluster and one sshd serve the whole session.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
HOSTS_LINE = "127.0.0.1 n1 n2  # vit-pretrain launch tests"
SSH_BEGIN, SSH_END = "# >>> vit-pretrain launch tests >>>", "# <<< vit-pretrain launch tests <<<"
APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "pdsh", "openssh-server", "openssh-client"]
BINARIES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge",
            "pdsh": "pdsh", "sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client"}

ALLREDUCE_SCRIPT = '''\
"""Join the job through pretrain.dist.setup() and all_reduce (rank + 1); print one line per rank."""
import os, socket, sys
import torch, torch.distributed as dist
from pretrain import dist as pd
from pretrain.errors import UserError
try:
    d = pd.setup()
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
t = torch.tensor([float(d.rank + 1)])
dist.all_reduce(t)
print(f"ALLREDUCE rank={d.rank} world={d.world_size} launcher={d.launcher} host={socket.gethostname()} "
      f"sum={t.item()}", flush=True)
pd.teardown()
'''

DIST_VARS = re.compile(r"^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|SLURM_.*|"
                       r"TORCHELASTIC_.*|CROSS_RANK|CROSS_SIZE|LOCAL_SIZE|GROUP_RANK)$")


def extensions_dir() -> str:
    """One compile cache for DeepSpeed's ops, shared by every launch test (and run): compiled once."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")


def base_env(**extra: str) -> dict:
    """The test process's environment without any launcher variables, set for CPU runs of the repo."""
    env = {k: v for k, v in os.environ.items() if not DIST_VARS.match(k)}
    env.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=extensions_dir(), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def parse_allreduce(stdout: str) -> dict:
    """{rank: (world, launcher, sum)} from ALLREDUCE_SCRIPT's lines."""
    out = {}
    for m in re.finditer(r"ALLREDUCE rank=(\d+) world=(\d+) launcher=(\w+) host=\S+ sum=([\d.]+)", stdout):
        out[int(m.group(1))] = (int(m.group(2)), m.group(3), float(m.group(4)))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_root_and_packages() -> None:
    if os.geteuid() != 0:
        pytest.skip("launch tests need root: they install slurm/munge/pdsh/sshd with apt-get and start daemons")
    missing = sorted({pkg for b, pkg in BINARIES.items() if not (shutil.which(b) or Path("/usr/sbin", b).exists())})
    if not missing:
        return
    if not shutil.which("apt-get"):
        pytest.skip(f"launch tests need {', '.join(missing)} and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=600)
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"apt-get install failed: {r.stderr[-2000:]}"


def ensure_hosts() -> bool:
    """n1 and n2 resolve to loopback (the master address must resolve, or ranks hang). True if added."""
    text = Path("/etc/hosts").read_text()
    if HOSTS_LINE in text:
        return False
    with open("/etc/hosts", "a") as f:
        f.write(("" if text.endswith("\n") else "\n") + HOSTS_LINE + "\n")
    return True


def remove_hosts_line() -> None:
    lines = Path("/etc/hosts").read_text().splitlines(keepends=True)
    Path("/etc/hosts").write_text("".join(ln for ln in lines if HOSTS_LINE not in ln))


def _wait_file(path: Path, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if time.monotonic() > deadline:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} did not start within {timeout}s (no {path}); log: {tail}")
        time.sleep(0.1)


def stop_pids(pidfiles: list[Path]) -> None:
    """SIGTERM every daemon by the pid in its pid file, then SIGKILL what is left after 10 s."""
    pids = []
    for p in pidfiles:
        try:
            pids.append(int(p.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


SLURM_CONF = """\
ClusterName=ci
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire=20
# a requeued batch job may start again only after cred_expire (default 120 s): shorter here for tests
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=20
MinJobAge=600
# GPUs as a generic resource, so jobs submit with --gpus-per-node / --gpus-per-task as on a GPU cluster:
# gres.conf names fake devices (see GRES_CONF); CPUs above the box's count need config_overrides
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs={cpus} RealMemory=2000 Gres=gpu:{gpus}
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs={cpus} RealMemory=2000 Gres=gpu:{gpus}
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""

NODE_CPUS, NODE_GPUS = 4, 2
GRES_CONF = """\
AutoDetect=off
Name=gpu File={d}/dev/gpu[0-{last}]
"""
# slurmd only accepts character or block devices as GPU files: each fake GPU is a node with /dev/null's
# numbers (1, 3). SLURM then sets CUDA_VISIBLE_DEVICES / SLURM_STEP_GPUS per task from the file's index.


class SlurmCluster:
    """A running controller + nodes n1, n2; `env` has SLURM_CONF for sbatch/srun/scontrol."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = base_env(SLURM_CONF=str(self.conf))

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}: {r.stdout[-1500:]} {r.stderr[-1500:]}")
        return r

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} when the job is gone."""
        r = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv) if r.returncode == 0 else {}

    def wait_job(self, job_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout}s; "
                             f"slurmctld log: {(self.root / 'log' / 'slurmctld.log').read_text()[-2000:]}")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted((self.root / "log").glob("*.log")))


@pytest.fixture(scope="session")
def slurm_cluster():
    ensure_root_and_packages()
    root = Path(tempfile.mkdtemp(prefix="vitp-slurm-"))
    root.chmod(0o755)
    for sub in ("state", "run", "log"):
        (root / sub).mkdir()
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o755)
    munge = pwd.getpwnam("munge")
    os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
    conf = SLURM_CONF.format(d=root, ctld_port=_free_port(), n1_port=_free_port(), n2_port=_free_port(),
                             cpus=NODE_CPUS, gpus=NODE_GPUS)
    (root / "slurm.conf").write_text(conf)
    (root / "dev").mkdir()
    for i in range(NODE_GPUS):
        os.mknod(root / "dev" / f"gpu{i}", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "gres.conf").write_text(GRES_CONF.format(d=root, last=NODE_GPUS - 1))
    added_hosts = ensure_hosts()
    pidfiles = [munge_dir / "munged.pid", root / "run" / "slurmctld.pid", root / "run" / "slurmd-n1.pid",
                root / "run" / "slurmd-n2.pid"]
    cluster = SlurmCluster(root)
    try:
        subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={munge_dir}/munge.socket",
                        f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
                        f"--seed-file={munge_dir}/munged.seed"], check=True, timeout=30, capture_output=True)
        _wait_file(pidfiles[0], 10, "munged", munge_dir / "munged.log")
        cluster.run("slurmctld")
        _wait_file(pidfiles[1], 20, "slurmctld", root / "log" / "slurmctld.log")
        cluster.run("slurmd", "-N", "n1")
        cluster.run("slurmd", "-N", "n2")
        deadline = time.monotonic() + 30
        while "idle" not in (s := cluster.run("sinfo", "-h", "-o", "%D %t", check=False).stdout) or \
                not s.strip().startswith("2 "):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle after 30s: {s!r}\n{cluster.logs()}")
            time.sleep(0.3)
        yield cluster
    finally:
        stop_pids(pidfiles[::-1])
        if added_hosts:
            remove_hosts_line()
        shutil.rmtree(root, ignore_errors=True)


class SshLoopback:
    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port


@pytest.fixture(scope="session")
def ssh_loopback():
    """sshd on 127.0.0.1 (own config, key and port) and a ~/.ssh/config block for hosts n1, n2."""
    ensure_root_and_packages()
    root = Path(tempfile.mkdtemp(prefix="vitp-ssh-"))
    root.chmod(0o755)
    port = _free_port()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "id")], check=True)
    shutil.copy(root / "id.pub", root / "authorized_keys")
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root}/host_key\nAuthorizedKeysFile {root}/authorized_keys\n"
        f"PidFile {root}/sshd.pid\nStrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nPermitUserEnvironment no\nAcceptEnv *\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory sshd insists on
    ssh_dir = Path.home() / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    cfg = ssh_dir / "config"
    old = cfg.read_text() if cfg.exists() else None
    block = (f"{SSH_BEGIN}\nHost n1 n2\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {root}/id\n"
             "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n"
             f"{SSH_END}\n")
    added_hosts = ensure_hosts()
    try:
        cfg.write_text(block + (old or ""))
        cfg.chmod(0o600)
        subprocess.run([shutil.which("sshd") or "/usr/sbin/sshd", "-f", str(root / "sshd_config"),
                        "-E", str(root / "sshd.log")], check=True, timeout=30)
        _wait_file(root / "sshd.pid", 10, "sshd", root / "sshd.log")
        for host in ("n1", "n2"):
            r = subprocess.run(["ssh", host, "hostname"], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, f"ssh {host} failed: {r.stderr} {(root / 'sshd.log').read_text()[-1500:]}"
        yield SshLoopback(root, port)
    finally:
        stop_pids([root / "sshd.pid"])
        if old is None:
            cfg.unlink(missing_ok=True)
        else:
            cfg.write_text(old)
        if added_hosts:
            remove_hosts_line()
        shutil.rmtree(root, ignore_errors=True)
