"""Bounded failure (issue 17): a stopped (SIGSTOP) or killed (SIGKILL) rank, and a killed
launcher, end every rank of the job within --hang-timeout-s, under the deepspeed launcher and
torchrun, with a message naming the ranks, the step and the phase. (srun: tests/system/test_slurm.py.)"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from s2moe_ds.parallel import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
BOUND = 15  # --hang-timeout-s


def _processes_naming(text):
    """Pids of the processes whose command line holds `text` (the run's out-dir)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def _start(launcher, out, tmp_path):
    port = str(free_port())
    prefix = ([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", port] if launcher == "deepspeed"
              else [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", port])
    cmd = prefix + [os.path.join(ROOT, "launch", "pretrain.py"), "--deepspeed_config",
                    os.path.join(ROOT, "ds_configs", "zero2.json"), "--preset", "tiny", "--ep-size", "2",
                    "--out-dir", str(out), "--seq-len", "32", "--max-steps", "100000", "--eval-interval", "0",
                    "--save-interval", "0", "--hang-timeout-s", str(BOUND)]
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    beats = [out / "heartbeat" / f"rank{r}.json" for r in range(2)]
    deadline = time.time() + 240
    while not all(b.exists() for b in beats):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(2)  # a few steps in
    return proc, [json.loads(b.read_text())["pid"] for b in beats]


def _wait_all_gone(proc, out, limit):
    """Seconds until the launcher and every process of the run ended (fails after `limit`)."""
    start = time.time()
    while time.time() - start < limit:
        if proc.poll() is not None and not _processes_naming(str(out)):
            return time.time() - start
        time.sleep(0.25)
    for pid in _processes_naming(str(out)):
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    pytest.fail(f"the job was still running {limit} s after the fault")


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
@pytest.mark.parametrize("fault", ["stop rank", "kill launcher", "kill rank"])
def test_a_fault_ends_every_rank_within_the_bound(launcher, fault, tmp_path):
    out = tmp_path / "run"
    proc, pids = _start(launcher, out, tmp_path)
    if fault == "stop rank":
        os.kill(pids[1], signal.SIGSTOP)
    elif fault == "kill rank":
        os.kill(pids[0], signal.SIGKILL)  # rank 0: the one the deepspeed launcher used to misname
    else:
        os.kill(proc.pid, signal.SIGKILL)
    seconds = _wait_all_gone(proc, out, BOUND + 30)
    log = (tmp_path / "log").read_text()
    if fault == "stop rank":
        assert seconds < BOUND + 10, seconds
        assert "watchdog: rank 0 made no progress for " in log and f"(hang_timeout_s {BOUND}) at step " in log
        assert "rank 1 (host " in log and f"pid {pids[1]}): not responding for " in log
        assert "the rank(s) not responding: 1" in log
        assert proc.returncode != 0
    elif fault == "kill launcher":
        assert seconds < 10, seconds
        assert f"its launcher (pid {proc.pid}: " in log and "instead of training on as an orphan" in log
    else:
        assert seconds < BOUND + 10 and proc.returncode != 0, seconds
        # The survivor says where it was and which rank is gone, before its traceback.
        assert re.search(r"rank 1 failed at step \d+, phase '[^']+': ", log), log[-3000:]
        assert "rank 0 (host " in log and f"pid {pids[0]}): gone (its process has exited)" in log, log[-3000:]
