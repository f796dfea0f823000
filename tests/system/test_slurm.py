"""slurm/pretrain.sh against a real single-node SLURM (tests/slurm_cluster.py): a 2-task job trains,
checkpoints and logs; a pre-timeout signal checkpoints, requeues and resumes with no lost steps; a
job that fails for another reason is not requeued; a stopped or killed task ends the job within
the bound, and a killed srun its tasks."""

import json
import os
import re
import sys

import pytest

from ..slurm_cluster import SlurmCluster, running, why_unavailable
from .test_failures import _processes_naming

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "slurm", "pretrain.sh")
TEXT = ("The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place "
        "beneath. It is twice blest: it blesseth him that gives and him that takes.\n") * 60

pytestmark = pytest.mark.skipif(why_unavailable() is not None, reason=why_unavailable() or "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running(SlurmCluster(str(tmp_path_factory.mktemp("slurm"))))


def _submit(cluster, tmp_path, name, extra, sbatch_args=()):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    out_dir = tmp_path / name
    env = {"S2MOE_REPO": ROOT, "PYTHON": sys.executable, "OUT_DIR": str(out_dir), "PRESET": "tiny", "DATASET": "path",
           "DATA_PATH": str(text), "OMP_NUM_THREADS": "1"}
    args = ["--job-name", name, "--ntasks-per-node", "2", "--cpus-per-task", "1", "--nodes", "1",
            "--output", str(tmp_path / f"{name}-%j.out"), *sbatch_args, SCRIPT,
            "--cache-dir", str(tmp_path / "cache"), "--seq-len", "32", "--d-model", "32", "--d-inner", "64",
            "--log-interval", "1", *extra]
    return cluster.sbatch(args, env=env, cwd=str(tmp_path)), out_dir


def _done(state):
    return state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _slurm_output(tmp_path, name, job):
    with open(tmp_path / f"{name}-{job}.out") as f:
        return f.read()


def _tb_steps(tb_dir, tag="train/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_two_task_job_trains_checkpoints_and_logs(cluster, tmp_path):
    job, out = _submit(cluster, tmp_path, "basic", ["--max-steps", "4", "--eval-interval", "2"])
    state = cluster.wait(job, _done, timeout=300)
    log = _slurm_output(tmp_path, "basic", job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log + cluster.logs()
    assert "2 tasks on 1 node(s)" in log and f"tensorboard --logdir {out}/tensorboard" in log
    record = json.loads((out / "run_config.json").read_text())
    assert record["world_size"] == 2 and record["parallel"]["ep_size"] == 2
    assert (out / "checkpoints" / "step00000004" / "COMPLETE").exists()
    assert len([f for f in os.listdir(out / "checkpoints" / "step00000004") if "_expert_" in f]) == 8
    assert _tb_steps(out / "tensorboard") == [1, 2, 3, 4]
    ranks = sorted(f for f in os.listdir(out / "logs") if f.startswith(f"job{job}-restart0-rank"))
    assert ranks == [f"job{job}-restart0-rank0.log", f"job{job}-restart0-rank1.log"]


def test_pre_timeout_signal_checkpoints_requeues_and_resumes(cluster, tmp_path):
    steps = 300
    job, out = _submit(cluster, tmp_path, "requeue",
                       ["--max-steps", str(steps), "--eval-interval", "0", "--save-interval", "100000"])
    rank0 = out / "logs" / f"job{job}-restart0-rank0.log"
    cluster.wait(job, lambda s: _done(s) or (rank0.exists() and "| loss " in rank0.read_text(errors="replace")),
                 timeout=300)
    # What SLURM sends before the time limit (#SBATCH --signal=USR1@300), sent now to every task.
    signalled = cluster.run("scancel", "--signal=USR1", job)
    assert signalled.returncode == 0, signalled.stderr
    # SLURM holds a requeued job for AuthInfo's cred_expire (120 s by default, 10 s on the test cluster).
    state = cluster.wait(job, lambda s: _done(s) and s.get("Restarts") == "1", timeout=400)
    log = _slurm_output(tmp_path, "requeue", job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{log}\n{cluster.logs()}"
    first = rank0.read_text(errors="replace")
    stopped = re.search(r"SIGUSR1: checkpointed step (\d+), exiting for requeue", first)
    assert stopped, log + first[-3000:] + str(state)
    n = int(stopped.group(1))
    assert 0 < n < steps
    second = (out / "logs" / f"job{job}-restart1-rank0.log").read_text(errors="replace")
    assert f"at step {n}" in second and "resumed from" in second, log + second[-3000:]
    assert "requeueing job" in log, log
    assert (out / "checkpoints" / f"step{steps:08d}" / "COMPLETE").exists()
    assert sorted(set(_tb_steps(out / "tensorboard"))) == list(range(1, steps + 1))  # no lost steps
    assert not (out / "REQUEUE").exists()


def test_job_failing_for_another_reason_is_not_requeued(cluster, tmp_path):
    job, out = _submit(cluster, tmp_path, "bad", ["--max-steps", "2", "--num-experts", "5"])
    state = cluster.wait(job, _done, timeout=300)
    log = _slurm_output(tmp_path, "bad", job)
    assert state["JobState"] == "FAILED" and state.get("Restarts") == "0", log
    # srun reports the first failing task's status (2), or 143 for a task it terminated after that.
    assert re.search(r"training exited with status (2|143)\n", log), log
    rank_logs = [(out / "logs" / f"job{job}-restart0-rank{r}.log").read_text() for r in range(2)]
    assert any("moe.num_experts" in text for text in rank_logs), rank_logs


def test_finetune_job_fine_tunes_a_pretrained_checkpoint(cluster, tmp_path):
    """SCRIPT=launch/finetune.py: the same script, layout and resume flags for fine-tuning."""
    job, pretrained = _submit(cluster, tmp_path, "lm", ["--max-steps", "2", "--eval-interval", "0"])
    state = cluster.wait(job, _done, timeout=300)
    assert state["JobState"] == "COMPLETED", _slurm_output(tmp_path, "lm", job)
    data = tmp_path / "labelled"
    data.mkdir()
    for split, n in (("train", 40), ("valid", 8), ("test", 8)):
        rows = [{"text": "mercy" if i % 2 else "rain", "label": i % 2} for i in range(n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ft"
    env = {"S2MOE_REPO": ROOT, "PYTHON": sys.executable, "OUT_DIR": str(out), "SCRIPT": "launch/finetune.py",
           "PRETRAINED": str(pretrained), "DATASET": "files", "DATA_PATH": str(data), "OMP_NUM_THREADS": "1"}
    args = ["--job-name", "ft", "--ntasks-per-node", "2", "--cpus-per-task", "1", "--nodes", "1",
            "--output", str(tmp_path / "ft-%j.out"), SCRIPT, "--max-steps", "4", "--eval-interval", "2"]
    job = cluster.sbatch(args, env=env, cwd=str(tmp_path))
    state = cluster.wait(job, _done, timeout=300)
    log = _slurm_output(tmp_path, "ft", job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log + cluster.logs()
    report = json.loads((out / "finetune_eval.json").read_text())
    assert {(r["split"], r["eval_k"]) for r in report["results"]} == {(s, k) for s in ("valid", "test") for k in (1, 2)}
    record = json.loads((out / "run_config.json").read_text())
    assert record["world_size"] == 2 and record["parallel"]["ep_size"] == 2
    assert (out / "checkpoints" / "step00000004" / "COMPLETE").exists()


def test_a_stopped_task_ends_the_job_within_the_bound(cluster, tmp_path):
    """SIGSTOP of one task: the other's watchdog names it and ends the job (issue 17)."""
    import signal
    import time
    bound = 10  # --hang-timeout-s: what the job waits out
    job, out = _submit(cluster, tmp_path, "hang", ["--max-steps", "100000", "--eval-interval", "0",
                                                   "--save-interval", "0", "--hang-timeout-s", str(bound)])
    beat = out / "heartbeat" / "rank1.json"
    cluster.wait(job, lambda s: _done(s) or beat.exists(), timeout=300)
    time.sleep(2)
    pid = json.loads(beat.read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    state = cluster.wait(job, _done, timeout=bound + 60)
    seconds = time.time() - stopped_at
    rank0 = (out / "logs" / f"job{job}-restart0-rank0.log").read_text(errors="replace")
    assert state["JobState"] == "FAILED" and state.get("Restarts") == "0", _slurm_output(tmp_path, "hang", job)
    assert seconds < bound + 15, seconds
    assert "watchdog: rank 0 made no progress for " in rank0 and f"pid {pid}): not responding for " in rank0, rank0[-3000:]
    assert "the rank(s) not responding: 1" in rank0


def test_a_killed_task_ends_the_job_and_is_named(cluster, tmp_path):
    """SIGKILL of task 0: srun ends the job (--kill-on-bad-exit); the other task names it (issue 17)."""
    import signal
    import time
    job, out = _submit(cluster, tmp_path, "killed", ["--max-steps", "100000", "--eval-interval", "0",
                                                     "--save-interval", "0", "--hang-timeout-s", "15"])
    beats = [out / "heartbeat" / f"rank{r}.json" for r in range(2)]
    cluster.wait(job, lambda s: _done(s) or all(b.exists() for b in beats), timeout=300)
    time.sleep(2)
    pid = json.loads(beats[0].read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    state = cluster.wait(job, _done, timeout=60)
    assert state["JobState"] == "FAILED" and time.time() - killed < 30, state
    rank1 = (out / "logs" / f"job{job}-restart0-rank1.log").read_text(errors="replace")
    assert re.search(r"rank 1 failed at step \d+, phase '[^']+': ", rank1), rank1[-3000:]
    assert f"pid {pid}): gone (its process has exited)" in rank1, rank1[-3000:]


def test_a_killed_srun_ends_its_tasks(cluster, tmp_path):
    """SIGKILL of the job step's launcher (srun): no task trains on as an orphan (issue 17)."""
    import signal
    import time
    job, out = _submit(cluster, tmp_path, "orphan", ["--max-steps", "100000", "--eval-interval", "0",
                                                     "--save-interval", "0", "--hang-timeout-s", "15"])
    beats = [out / "heartbeat" / f"rank{r}.json" for r in range(2)]
    cluster.wait(job, lambda s: _done(s) or all(b.exists() for b in beats), timeout=300)
    pids = [json.loads(b.read_text())["pid"] for b in beats]
    sruns = [p for p in _processes_naming(str(out)) if open(f"/proc/{p}/comm").read().strip() == "srun"]
    assert sruns, "no srun process found for the job"
    for p in sruns:
        os.kill(p, signal.SIGKILL)
    killed = time.time()
    while time.time() - killed < 45 and any(_alive_pid(p) for p in pids):
        time.sleep(0.5)
    seconds = time.time() - killed
    assert not any(_alive_pid(p) for p in pids), f"tasks still running {seconds:.0f} s after srun was killed"
    print(f"srun killed: tasks gone after {seconds:.1f} s")
    # The job ends too. Stopping slurmd while the job is still completing would cost the module's
    # teardown 20 s and leave the step's slurmstepd behind.
    cluster.wait(job, _done, timeout=60)


def _alive_pid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
