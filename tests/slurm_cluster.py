"""A real single-node SLURM cluster on loopback, for tests: munged, slurmctld and slurmd from
Debian's packages, started as root with a private munge socket and key, private ports and every
state file under one scratch folder, so nothing clashes with a system installation.

    cluster = SlurmCluster(tmp_dir); cluster.start()   # node idle in about a second
    job = cluster.sbatch(["--ntasks", "2", "script.sh"], env={...})
    cluster.wait(job, lambda s: s["JobState"] == "COMPLETED")
    cluster.stop()                                      # by the PIDs it started

`.ci/run` installs the packages; where they are missing, `why_unavailable()` says so and the tests
skip with that reason.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Callable, Dict, List, Optional

from s2moe_ds.parallel import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")


def why_unavailable() -> Optional[str]:
    missing = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        return f"SLURM not installed (missing {', '.join(missing)}); apt-get install slurmctld slurmd slurm-client munge"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root (SlurmUser=root)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.conf = os.path.join(self.root, "slurm.conf")
        self.socket = os.path.join(self.root, "munge", "munge.socket")
        self.pidfiles = {name: os.path.join(self.root, f"{name}.pid") for name in ("munged", "slurmctld", "slurmd")}
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        # A test run inside someone's job must not hand its job's variables to ours.
        for key in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[key]
        self.node = socket.gethostname().split(".")[0]

    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(os.path.join(self.root, "munge"), 0o700)
        key = os.path.join(self.root, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        cpus = os.cpu_count() or 2
        r = self.root
        lines = [
            "ClusterName=s2moe-test", "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "SlurmUser=root", "SlurmdUser=root",
            # cred_expire also sets how long slurmd refuses a requeued job's id (default 120 s).
            "AuthType=auth/munge", f"AuthInfo=socket={self.socket},cred_expire=10", "CredType=cred/munge",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={self.pidfiles['slurmctld']}", f"SlurmdPidFile={self.pidfiles['slurmd']}",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2", "MailProg=/bin/true",
            "JobRequeue=1", "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1",
            "MinJobAge=300", "KillWait=5", "InactiveLimit=0",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> None:
        self._write_config()
        r = self.root
        subprocess.run([_binary("munged"), "--force", f"--socket={self.socket}",
                        f"--key-file={r}/munge/munge.key", f"--pid-file={self.pidfiles['munged']}",
                        f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed"],
                       check=True, env=self.env, timeout=30)
        subprocess.run([_binary("slurmctld"), "-f", self.conf], check=True, env=self.env, timeout=30)
        subprocess.run([_binary("slurmd"), "-f", self.conf], check=True, env=self.env, timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"SLURM node did not become idle in {timeout:.0f} s:\n{self.logs()}")

    def logs(self) -> str:
        text = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text.append(f"== {name}\n" + "".join(f.readlines()[-30:]))
        return "\n".join(text)

    def stop(self) -> None:
        """Stop the daemons this cluster started, by the PIDs in their pidfiles, and wait for them."""
        pids = []
        for name in ("slurmd", "slurmctld", "munged"):
            try:
                with open(self.pidfiles[name]) as f:
                    pids.append(int(f.read().strip()))
            except (OSError, ValueError):
                continue
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        for pid in pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def sbatch(self, args: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                             env={**self.env, **(env or {})}, cwd=cwd, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             env=self.env, timeout=30)
        fields = {}
        for item in out.stdout.split():
            if "=" in item:
                key, _, value = item.partition("=")
                fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, until: Callable[[Dict[str, str]], bool], timeout: float) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        state: Dict[str, str] = {}
        while time.monotonic() < deadline:
            state = self.job(job_id)
            if state and until(state):
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not reach the expected state in {timeout:.0f} s; last: "
                           f"{state.get('JobState')} {state.get('Reason')}\n{self.logs()}")

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
