"""Multi-node on one machine (issue 17): two test hosts as network namespaces joined by a veth pair,
a SLURM cluster with one slurmd per host (tests/slurm_cluster.py, TwoHostCluster). `sbatch --nodes 2
slurm/pretrain.sh` trains with an expert-parallel group that spans the hosts, checkpoints on the
pre-timeout signal, requeues and resumes on both with every step present; torchrun's multi-node
rendezvous trains across them; a host killed mid-job ends the job within the bound."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from ..slurm_cluster import TwoHostCluster, running, why_unavailable
from .test_slurm import TEXT, _done, _slurm_output, _tb_steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "slurm", "pretrain.sh")
BOUND = 15  # --hang-timeout-s


pytestmark = pytest.mark.skipif(why_unavailable(two_hosts=True) is not None, reason=why_unavailable(True) or "")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    yield from running(TwoHostCluster(str(tmp_path_factory.mktemp("hosts"))))


def _env(cluster, tmp_path, out_dir):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    # Rendezvous on the first host's address; gloo on the hosts' network (its interface has one name
    # on every host, as on a cluster's nodes).
    return {"S2MOE_REPO": ROOT, "PYTHON": sys.executable, "OUT_DIR": str(out_dir), "PRESET": "tiny",
            "DATASET": "path", "DATA_PATH": str(text), "OMP_NUM_THREADS": "1", "EP_SIZE": "2",
            "MASTER_ADDR": cluster.addr["s2h1"], "GLOO_SOCKET_IFNAME": cluster.IFNAME}


def _submit(cluster, tmp_path, name, extra):
    out_dir = tmp_path / name
    args = ["--job-name", name, "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "1",
            "--output", str(tmp_path / f"{name}-%j.out"), SCRIPT, "--cache-dir", str(tmp_path / "cache"),
            "--seq-len", "32", "--d-model", "32", "--d-inner", "64", "--log-interval", "1", *extra]
    return cluster.sbatch(args, env=_env(cluster, tmp_path, out_dir), cwd=str(tmp_path)), out_dir


def test_two_host_job_trains_requeues_and_resumes_on_both_hosts(hosts, tmp_path):
    steps = 300
    job, out = _submit(hosts, tmp_path, "mn", ["--max-steps", str(steps), "--eval-interval", "0",
                                               "--save-interval", "100000"])
    rank0 = out / "logs" / f"job{job}-restart0-rank0.log"
    hosts.wait(job, lambda s: _done(s) or (rank0.exists() and "| loss " in rank0.read_text(errors="replace")),
               timeout=300)
    first = hosts.job(job)
    assert first["NumNodes"] == "2" and first["NodeList"] == "s2h[1-2]", first
    signalled = hosts.run("scancel", "--signal=USR1", job)
    assert signalled.returncode == 0, signalled.stderr
    state = hosts.wait(job, lambda s: _done(s) and s.get("Restarts") == "1", timeout=400)
    print(f"two hosts: signalled and requeued job {state['JobState']}")
    log = _slurm_output(tmp_path, "mn", job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{log}\n{hosts.logs()}"
    assert "2 tasks on 2 node(s) (s2h[1-2])" in log and "requeueing job" in log, log
    stopped = re.search(r"SIGUSR1: checkpointed step (\d+), exiting for requeue", rank0.read_text(errors="replace"))
    n = int(stopped.group(1))
    assert 0 < n < steps
    second = (out / "logs" / f"job{job}-restart1-rank0.log").read_text(errors="replace")
    assert f"resumed from {out}/checkpoints/step{n:08d} at step {n}" in second, second[-3000:]
    record = json.loads((out / "run_config.json").read_text())
    # One expert-parallel group of both ranks, one per host: the all-to-all crosses the hosts.
    assert record["world_size"] == 2 and record["parallel"]["ep_size"] == 2
    meta = json.loads((out / "checkpoints" / f"step{steps:08d}" / "meta.json").read_text())
    assert meta["expert_ranks"] == [[0, 0], [1, 0]]
    assert sorted(set(_tb_steps(out / "tensorboard"))) == list(range(1, steps + 1))  # no lost steps


def test_torchrun_rendezvous_across_two_hosts(hosts, tmp_path):
    out = tmp_path / "tr"
    env = dict(os.environ, **_env(hosts, tmp_path, out))
    port = "29555"
    procs = []
    for node, host in enumerate(hosts.hosts):
        cmd = [*hosts.on(host), os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nnodes", "2",
               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{hosts.addr['s2h1']}:{port}",
               "--rdzv_id", "s2moe-test",
               # Which host serves the rendezvous store, and each host's address for the ranks:
               # torchrun would take both from the host name, which the test hosts share.
               "--rdzv_conf", f"is_host={int(node == 0)}", "--local_addr", hosts.addr[host],
               os.path.join(ROOT, "launch", "pretrain.py"),
               "--deepspeed_config", os.path.join(ROOT, "ds_configs", "zero2.json"), "--preset", "tiny",
               "--ep-size", "2", "--dataset", "path", "--path", env["DATA_PATH"],
               "--cache-dir", str(tmp_path / "cache"),
               "--out-dir", str(out), "--seq-len", "32", "--d-model", "32", "--d-inner", "64", "--max-steps", "3",
               "--eval-interval", "3", "--expect-world-size", "2"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=150)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outputs.append(p.communicate()[0])
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    assert (out / "checkpoints" / "step00000003" / "COMPLETE").exists()


def test_a_killed_host_ends_the_job_within_the_bound(hosts, tmp_path):
    """Last: the second host stays down."""
    job, out = _submit(hosts, tmp_path, "down", ["--max-steps", "100000", "--eval-interval", "0",
                                                 "--save-interval", "0", "--hang-timeout-s", str(BOUND)])
    beat = out / "heartbeat" / "rank1.json"
    hosts.wait(job, lambda s: _done(s) or beat.exists(), timeout=300)
    time.sleep(2)
    hosts.kill_host("s2h2")
    killed = time.time()
    state = hosts.wait(job, lambda s: s["JobState"] != "RUNNING", timeout=BOUND + 60)
    seconds = time.time() - killed
    print(f"host killed: job {state['JobState']} after {seconds:.1f} s")
    assert seconds < BOUND + 20, (seconds, state)
    rank0 = (out / "logs" / f"job{job}-restart0-rank0.log").read_text(errors="replace")
    assert "Traceback" in rank0 or "watchdog:" in rank0, rank0[-3000:]
    assert state["JobState"] in ("FAILED", "NODE_FAIL", "PENDING", "REQUEUED", "CANCELLED"), state
