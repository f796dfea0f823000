"""Bounded failure (issue 17): a stopped (SIGSTOP) or killed (SIGKILL) rank, and a killed
launcher, end every rank of the job within --hang-timeout-s, under the deepspeed launcher and
torchrun, with a message naming the ranks, the step and the phase. (srun: tests/system/test_slurm.py.)
The watchdog lives outside the rank (issue 26): a rank that holds Python's lock, segfaults or
aborts (S2MOE_INJECT_FAULT, s2moe_ds/train/faults.py) ends the job too, its checkpoints intact."""

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
BOUND = 10  # --hang-timeout-s of every job here: what a stopped or faulted rank's job waits out


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


def _command(launcher, out, *flags):
    port = str(free_port())
    prefix = ([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", port] if launcher == "deepspeed"
              else [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", port])
    cmd = prefix + [os.path.join(ROOT, "launch", "pretrain.py"), "--deepspeed_config",
                    os.path.join(ROOT, "ds_configs", "zero2.json"), "--preset", "tiny", "--ep-size", "2",
                    "--out-dir", str(out), "--seq-len", "32", "--max-steps", "100000", "--eval-interval", "0",
                    *flags]
    return cmd


def _start(launcher, out, tmp_path):
    cmd = _command(launcher, out, "--save-interval", "0", "--hang-timeout-s", str(BOUND))
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


FAULT_STEP = 5  # after the checkpoint of step 4 (--save-interval 2)


def _run_with_fault(kind, tmp_path, named):
    """A deepspeed job of 2 ranks whose rank 1 does `kind` at step FAULT_STEP: (seconds from the
    fault until the log matched `named`, until every process of the job was gone; the launcher's
    status, the log, the out-dir)."""
    out, log_path = tmp_path / "run", tmp_path / "log"
    cmd = _command("deepspeed", out, "--save-interval", "2", "--hang-timeout-s", str(BOUND))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(
            os.environ, OMP_NUM_THREADS="1", S2MOE_INJECT_FAULT=f"1:{FAULT_STEP}:{kind}"))
    pattern = re.compile(rf"injected fault: rank 1, step {FAULT_STEP}, phase '[^']+': {kind} at ([\d.]+)")
    deadline = time.time() + 300
    while not pattern.search(log_path.read_text()):
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.1)
    injected = float(pattern.search(log_path.read_text()).group(1))
    seen = None
    while time.time() - injected < BOUND + 60:
        if seen is None and re.search(named, log_path.read_text()):
            seen = time.time() - injected
        if proc.poll() is not None and not _processes_naming(str(out)):
            break
        time.sleep(0.1)
    else:
        for pid in _processes_naming(str(out)):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        pytest.fail(f"the job was still running {BOUND + 60} s after the fault")
    ended = time.time() - injected
    print(f"{kind}: the rank named {seen if seen is None else round(seen, 1)} s after the fault, every process of the job gone after {ended:.1f} s "
          f"(bound {BOUND} s), status {proc.returncode}")
    return seen, ended, proc.returncode, log_path.read_text(), out


def _assert_last_checkpoint_intact(out):
    from s2moe_ds.checkpoint import complete_tags, latest_tag
    from s2moe_ds.checkpoint.manifest import verify

    ckpt = str(out / "checkpoints")
    assert latest_tag(ckpt) == f"step{FAULT_STEP - 1:08d}" and complete_tags(ckpt)[0] == latest_tag(ckpt)
    verify(os.path.join(ckpt, latest_tag(ckpt)))


@pytest.mark.parametrize("kind", ["gil", "segfault", "abort"])
def test_a_rank_that_holds_the_interpreter_lock_or_crashes_ends_the_job(kind, tmp_path):
    # gil: rank 0's watcher names rank 1 (whose pulse thread cannot run), prints its stacks and
    # kills it. A crash is named by rank 1's watcher at once, not after the bound.
    named = ("the rank\\(s\\) not responding: 1" if kind == "gil" else
             rf"watchdog: rank 1 \(host [^,]+, pid \d+\) is gone at step {FAULT_STEP}, phase '[^']+', without finishing")
    seen, ended, status, log, out = _run_with_fault(kind, tmp_path, named)
    assert seen is not None and status != 0, log[-4000:]
    # Named within the bound and two beats (1 s each) plus a margin for a loaded machine; the
    # launchers take a few seconds more to end the rest.
    assert seen < (BOUND if kind == "gil" else 0) + 5, seen
    assert ended < seen + 15, ended
    if kind == "gil":
        assert "watchdog: rank 0 made no progress for " in log and "in _hold_the_interpreter_lock" in log, log[-4000:]
        assert re.search(r"watchdog: killed rank 1 \(pid \d+\)", log), log[-4000:]
    else:
        assert ("Fatal Python error: Segmentation fault" if kind == "segfault" else "Fatal Python error: Aborted") in log
    _assert_last_checkpoint_intact(out)


CHILD = """
import os, sys, time
from s2moe_ds.train.watchdog import Watchdog
from s2moe_ds.train.faults import KINDS
w = Watchdog(0, 1, sys.argv[1], 3.0)
w.start()
first = w._watcher.pid
print("watcher", first, flush=True)
w.progress(1, "forward")
w.stop()
print("first watcher left after stop:", os.path.exists(f"/proc/{first}"), flush=True)
w = Watchdog(0, 1, sys.argv[1], 3.0)
w.start()
print("watcher", w._watcher.pid, flush=True)
w.progress(1, "forward")
KINDS[sys.argv[2]]()
"""


@pytest.mark.parametrize("kind", ["gil", "sleep"])
def test_a_lone_frozen_rank_is_ended_by_its_own_watcher(kind, tmp_path):
    """World 1: no other rank to name it. Its watcher, a process of its own, ends it: with status
    124 when its interpreter still runs (blocked in C code that released the lock), killed after
    its stacks were printed when it holds the lock. A run that ends leaves no watcher behind."""
    out = tmp_path / "out"
    start = time.time()
    done = subprocess.run([sys.executable, "-c", CHILD, str(out), kind], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    log = done.stdout + done.stderr
    watchers = [int(p) for p in re.findall(r"watcher (\d+)", log)]
    assert len(watchers) == 2 and not _processes_naming(str(out)), log[-3000:]
    assert "first watcher left after stop: False" in log, log[-3000:]
    assert "watchdog: rank 0 made no progress for " in log and "(hang_timeout_s 3) at step 1, phase 'forward'" in log
    if kind == "gil":
        assert done.returncode == -signal.SIGKILL and "its interpreter has not run for " in log, log[-3000:]
        assert "in _hold_the_interpreter_lock" in log and "watchdog: killed rank 0 (pid " in log, log[-3000:]
    else:
        assert done.returncode == 124, log[-3000:]
    assert time.time() - start < 60


def test_a_malformed_fault_request_is_refused(monkeypatch):
    from s2moe_ds.config import ConfigError
    from s2moe_ds.train.faults import fault_from_env

    monkeypatch.setenv("S2MOE_INJECT_FAULT", "1:5:gil")
    assert fault_from_env(0) is None and fault_from_env(1).kind == "gil"
    for bad in ("1:x:gil", "1:5", "1:5:hang"):
        monkeypatch.setenv("S2MOE_INJECT_FAULT", bad)
        with pytest.raises(ConfigError, match=rf"S2MOE_INJECT_FAULT='{bad}' is not RANK:STEP:KIND with KIND one of "
                                              "gil, sleep, segfault, abort"):
            fault_from_env(0)
