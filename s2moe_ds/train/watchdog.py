"""Bounded failure: no rank waits without end.

Every rank has a watchdog from its first step to the end of the run. The loop tells it where it
is (`progress(step, phase)`: a few bytes written to memory it shares with its watcher, no I/O on
the training thread); a pulse thread notes, twice a beat, that the rank's interpreter still runs.
The watcher is a side process (watcher.py), so what freezes the rank (code holding Python's lock,
a SIGSTOP, a crash) does not freeze it. It writes the heartbeat, <out_dir>/heartbeat/rank<r>.json,
every few seconds, and

* when this rank has made no progress for `timeout_s` (a rank stopped or hung, or this one stuck
  in a collective that another rank never joined), it prints which ranks were heard from when, at
  which step and phase, kills the ranks of its host that are not responding, and ends this rank
  with EXIT_HUNG (its pulse thread exits; a rank whose interpreter does not run is killed, after
  faulthandler printed its threads' stacks); the launcher then ends the rest;
* when a launcher process above this rank died (the deepspeed runner or its per-node launcher,
  torchrun's agent, mpirun), it ends this rank too: no orphan goes on training and writing
  checkpoints;
* when this rank's process ended without finishing its run (a segfault, an abort, a kill), it
  says which rank it was and its step and phase.

Every process group's collective timeout (init_distributed) is that bound and a margin, so a
collective fails rather than waiting for ever should the watcher itself be gone.
"""

import faulthandler
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

from .faults import fault_from_env
from .watcher import (DUMP_SIGNAL, EXIT_HUNG, HEARTBEAT_DIR, LAUNCHERS, LAUNCHER_MODULES, SharedState,
                      beat_seconds, heartbeat_path, launcher_ancestors, peer_lines, proc_start, pulse_seconds)

__all__ = ["EXIT_HUNG", "HEARTBEAT_DIR", "LAUNCHERS", "LAUNCHER_MODULES", "Watchdog", "collective_timeout_s",
           "launcher_ancestors"]


def collective_timeout_s(hang_timeout_s: float) -> float:
    """Every process group's timeout: the watchdog's bound and a margin, so that the watchdog,
    which names the ranks, speaks before a collective fails with a bare timeout."""
    return hang_timeout_s * 1.05 + 5.0


WATCHER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "watcher.py")


class Watchdog:
    """One per rank; `start` at the first step, `stop` at the end of the run."""

    def __init__(self, rank: int, world: int, out_dir: str, timeout_s: float, beat_s: Optional[float] = None) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.dir = os.path.join(out_dir, HEARTBEAT_DIR)
        self.beat_s = beat_s if beat_s is not None else beat_seconds(timeout_s)
        self.step, self.phase, self.since = 0, "start", time.time()
        self.fault = fault_from_env(rank)
        self._state: Optional[SharedState] = None
        self._watcher: Optional[subprocess.Popen] = None
        self._wake_fd: Optional[int] = None
        self._stop = threading.Event()
        self._pulse: Optional[threading.Thread] = None
        self._faulthandler_was_on = True

    def progress(self, step: int, phase: str) -> None:
        self.step, self.phase, self.since = step, phase, time.time()
        if self._state is not None:
            self._state.write_progress(step, phase, self.since)
        if self.fault is not None:
            self.fault.at(step, phase)

    def start(self) -> None:
        if proc_start(os.getpid()) is None:  # the watcher tells a rank's process by /proc/<pid>/stat
            print("watchdog: /proc is not readable here, so no watcher runs: a hung rank is ended by the "
                  "collective timeout only", file=sys.stderr, flush=True)
            return
        os.makedirs(self.dir, exist_ok=True)
        self._state = SharedState.create()
        self._state.write_pulse(time.time())
        self.progress(self.step, self.phase)
        self._stop.clear()
        self._pulse = threading.Thread(target=self._beat, name="s2moe-watchdog-pulse", daemon=True)
        self._pulse.start()
        self._enable_stack_dumps()
        read_fd, self._wake_fd = os.pipe()
        try:
            self._watcher = subprocess.Popen(
                [sys.executable, "-I", "-S", WATCHER_SCRIPT, "--rank", str(self.rank), "--world", str(self.world),
                 "--dir", self.dir, "--timeout", repr(self.timeout_s), "--beat", repr(self.beat_s),
                 "--pid", str(os.getpid()), "--start", str(proc_start(os.getpid())),
                 "--state-fd", str(self._state.fd), "--wake-fd", str(read_fd)],
                stdin=subprocess.DEVNULL, pass_fds=(self._state.fd, read_fd))
        finally:
            os.close(read_fd)

    def stop(self) -> None:
        """The run ended (normally or by an exception, whose traceback speaks for itself): the
        watcher ends at once, and the heartbeat goes."""
        if self._watcher is None:
            return
        self._state.set_finished()
        os.close(self._wake_fd)  # wakes the watcher: EOF
        self._stop.set()
        self._pulse.join()
        started = time.time()
        while self._watcher.poll() is None and time.time() - started < 10:
            time.sleep(0.005)  # Popen.wait's back-off would add up to 50 ms to every run's end
        if self._watcher.poll() is None:
            self._watcher.kill()
            self._watcher.wait()
        self._watcher = None
        self._disable_stack_dumps()
        self._state.close()
        self._state = None
        try:
            os.remove(heartbeat_path(self.dir, self.rank))
        except OSError:
            pass

    def _beat(self) -> None:
        """The pulse: runs only while this interpreter does; exits the process on the watcher's verdict."""
        every = pulse_seconds(self.beat_s)
        while not self._stop.wait(every):
            self._state.write_pulse(time.time())
            verdict = self._state.verdict()
            if verdict:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(verdict)

    def _enable_stack_dumps(self) -> None:
        """faulthandler prints every thread's stack on a crash (SIGSEGV, SIGABRT, ...) and on
        DUMP_SIGNAL from the watcher, from C: it needs no Python lock."""
        out = sys.stderr if _has_fd(sys.stderr) else sys.__stderr__
        if not _has_fd(out):
            return
        self._faulthandler_was_on = faulthandler.is_enabled()
        if not self._faulthandler_was_on:
            faulthandler.enable(file=out, all_threads=True)
        faulthandler.register(DUMP_SIGNAL, file=out, all_threads=True, chain=False)

    def _disable_stack_dumps(self) -> None:
        faulthandler.unregister(DUMP_SIGNAL)
        if not self._faulthandler_was_on:
            faulthandler.disable()

    def report_failure(self, error: BaseException) -> None:
        """Before a failed rank's traceback (a collective that lost its peer, most often): where
        this rank was and what became of the others, since launchers name only the rank they saw
        exit first."""
        lines, _ = peer_lines(self.dir, self.rank, self.world, _host(), self.beat_s, time.time())
        first = (str(error).strip().splitlines() or [""])[0][:300]
        print("\n".join([f"rank {self.rank} failed at step {self.step}, phase '{self.phase}': "
                         f"{type(error).__name__}: {first}", *lines]), file=sys.stderr, flush=True)


def _has_fd(stream) -> bool:
    try:
        return stream is not None and stream.fileno() >= 0
    except (AttributeError, OSError, ValueError):
        return False


def _host() -> str:
    return socket.gethostname()
