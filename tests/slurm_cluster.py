"""A real single-node SLURM cluster on loopback, for tests: munged, slurmctld and slurmd from
Debian's packages, started as root with a private munge socket and key, private ports and every
state file under one scratch folder, so nothing clashes with a system installation.

    cluster = SlurmCluster(tmp_dir); cluster.start()   # node idle in about a second
    job = cluster.sbatch(["--ntasks", "2", "script.sh"], env={...})
    cluster.wait(job, lambda s: s["JobState"] == "COMPLETED")
    cluster.stop()                                      # by the PIDs it started

TwoHostCluster: the same over two test hosts (network namespaces joined by a veth pair), one
slurmd each, for multi-node jobs. `.ci/run` installs the packages; where they are missing,
`why_unavailable()` says so and the tests skip with that reason.
"""

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Callable, Dict, Iterator, List, Optional

from s2moe_ds.parallel import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")


def why_unavailable(two_hosts: bool = False) -> Optional[str]:
    if two_hosts and any(shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}") for b in ("ip", "nsenter")):
        return "the test hosts need ip (iproute2) and nsenter (util-linux)"
    missing = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        return (f"SLURM not installed (missing {', '.join(missing)}); "
                "apt-get install slurmctld slurmd slurm-client munge")
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
        self.client: List[str] = []  # what client commands (sbatch, scontrol) run under

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
            "ClusterName=s2moe-test", f"SlurmctldHost=localhost({self.controller_addr()})",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "SlurmUser=root", "SlurmdUser=root",
            # cred_expire also sets how long slurmd refuses a requeued job's id (default 120 s).
            "AuthType=auth/munge", f"AuthInfo=socket={self.socket},cred_expire=10", "CredType=cred/munge",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={self.pidfiles['slurmctld']}", f"SlurmdPidFile={self.pidfiles['slurmd']}",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd{self.node_suffix()}.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2", "MailProg=/bin/true",
            "JobRequeue=1", "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1",
            "MinJobAge=300", "KillWait=5", "InactiveLimit=0",
            *self.node_lines(cpus),
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def controller_addr(self) -> str:
        return "127.0.0.1"

    def node_suffix(self) -> str:
        return ""

    def node_lines(self, cpus: int) -> List[str]:
        return [f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
                f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"]

    def start_daemons(self) -> None:
        subprocess.run([_binary("slurmctld"), "-f", self.conf], check=True, env=self.env, timeout=30)
        subprocess.run([_binary("slurmd"), "-f", self.conf], check=True, env=self.env, timeout=30)

    def idle(self, states: List[str]) -> bool:
        return len(states) == 1 and states[0] in ("idle", "mixed", "allocated")

    def start(self, timeout: float = 60.0) -> None:
        self._write_config()
        r = self.root
        subprocess.run([_binary("munged"), "--force", f"--socket={self.socket}",
                        f"--key-file={r}/munge/munge.key", f"--pid-file={self.pidfiles['munged']}",
                        f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed"],
                       check=True, env=self.env, timeout=30)
        self.start_daemons()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run([*self.client, "sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                                 env=self.env)
            if out.returncode == 0 and self.idle(out.stdout.split()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"SLURM node did not become idle in {timeout:.0f} s:\n{self.logs()}")

    def logs(self) -> str:
        text = []
        for name in sorted(os.listdir(os.path.join(self.root, "log"))):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text.append(f"== {name}\n" + "".join(f.readlines()[-30:]))
        return "\n".join(text)

    def cancel_jobs(self, timeout: float = 30.0) -> None:
        """Cancel the jobs a failed test left behind while slurmd still runs, so that no batch script
        or srun outlives the cluster."""
        self.run("scancel", "--user", getpass.getuser())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i").stdout.strip():
            time.sleep(0.5)

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
        out = subprocess.run([*self.client, "sbatch", "--parsable", *args], capture_output=True, text=True,
                             env={**self.env, **(env or {})}, cwd=cwd, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        out = subprocess.run([*self.client, "scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
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
        return subprocess.run([*self.client, *cmd], capture_output=True, text=True, env=self.env, timeout=60)


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


SUBNET = "10.231.0"
"""The test hosts' addresses: <SUBNET>.1 and <SUBNET>.2, on their own veth pair only."""


class TwoHostCluster(SlurmCluster):
    """SLURM over two test hosts on one machine: network namespaces s2h1 and s2h2 joined by a veth
    pair, one slurmd per host, slurmctld on s2h1 (a head node that also computes), one munged for
    both (its socket is a file, which namespaces share, as they share the file system: the run
    folder is as shared as a cluster's). Client commands run on s2h1."""

    IFNAME = "s2net"

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.hosts = ["s2h1", "s2h2"]
        self.addr = {h: f"{SUBNET}.{i + 1}" for i, h in enumerate(self.hosts)}
        self.client = self.on(self.hosts[0])
        self.pidfiles["slurmd"] = os.path.join(self.root, "slurmd-%n.pid")

    @staticmethod
    def on(host: str) -> List[str]:
        """A command prefix that runs on `host`: its network namespace only (`ip netns exec` would
        also remount /sys, without the cgroup mounts slurmd needs)."""
        return ["nsenter", f"--net=/var/run/netns/{host}"]

    def controller_addr(self) -> str:
        return self.addr[self.hosts[0]]

    def node_suffix(self) -> str:
        return "-%n"

    def node_lines(self, cpus: int) -> List[str]:
        per_host = max(1, cpus // len(self.hosts))
        # A killed host is declared down within seconds, not SLURM's 5 minutes.
        return ["SlurmdTimeout=10", "MessageTimeout=5",
                *[f"NodeName={h} NodeAddr={self.addr[h]} CPUs={per_host} State=UNKNOWN" for h in self.hosts],
                f"PartitionName=test Nodes={','.join(self.hosts)} Default=YES MaxTime=INFINITE State=UP "
                "OverSubscribe=NO"]

    def _network(self) -> None:
        self._remove_network()
        run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, timeout=30)  # noqa: E731
        for h in self.hosts:
            run("ip", "netns", "add", h)
            run("ip", "netns", "exec", h, "ip", "link", "set", "lo", "up")
        run("ip", "link", "add", "s2v1", "type", "veth", "peer", "name", "s2v2")
        for i, h in enumerate(self.hosts):
            # One interface name on every host, as on a cluster's nodes: GLOO_SOCKET_IFNAME names it.
            run("ip", "link", "set", f"s2v{i + 1}", "netns", h)
            run("ip", "-n", h, "link", "set", f"s2v{i + 1}", "name", self.IFNAME)
            run("ip", "-n", h, "addr", "add", f"{self.addr[h]}/24", "dev", self.IFNAME)
            run("ip", "-n", h, "link", "set", self.IFNAME, "up")

    def _remove_network(self) -> None:
        for h in self.hosts:
            self.kill_host(h)
            subprocess.run(["ip", "netns", "del", h], capture_output=True, timeout=30)

    def start_daemons(self) -> None:
        self._network()
        subprocess.run([*self.client, _binary("slurmctld"), "-f", self.conf], check=True, env=self.env, timeout=30)
        for h in self.hosts:
            subprocess.run([*self.on(h), _binary("slurmd"), "-f", self.conf, "-N", h], check=True, env=self.env,
                           timeout=30)

    def idle(self, states: List[str]) -> bool:
        return len(states) == len(self.hosts) and all(s in ("idle", "mixed", "allocated") for s in states)

    def host_pids(self, host: str) -> List[int]:
        out = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True, timeout=30)
        return [int(p) for p in out.stdout.split()]

    def kill_host(self, host: str) -> None:
        """What a host failure does to its processes: every one of them (slurmd too) dies at once."""
        for pid in self.host_pids(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self._remove_network()  # the slurmds and every job process run in the namespaces
        super().stop()


def running(cluster: SlurmCluster, cancel_jobs: bool = False) -> Iterator[SlurmCluster]:
    """For a fixture (`yield from running(...)`): the cluster started, then, however the tests
    ended, its leftover jobs cancelled (with cancel_jobs) and its daemons stopped."""
    try:
        cluster.start()
        yield cluster
    finally:
        if cancel_jobs:
            cluster.cancel_jobs()
        cluster.stop()
