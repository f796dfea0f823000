"""Bounded failure: no rank waits without end.

Every rank runs a watchdog thread from its first step to the end of the run. The loop tells it
where it is (`progress(step, phase)`: a cheap assignment, no I/O on the training thread); the
thread writes that to <out_dir>/heartbeat/rank<r>.json every few seconds, and

* when this rank has made no progress for `timeout_s` (a rank stopped or hung, or this one stuck
  in a collective that another rank never joined), it prints which ranks were heard from when,
  at which step and phase, and ends the process with EXIT_HUNG; the launcher then ends the rest;
* when a launcher process above this rank died (the deepspeed runner or its per-node launcher,
  torchrun's agent, mpirun), it ends the process too: no orphan goes on training and writing
  checkpoints.

A hung rank's own thread stops with it (SIGSTOP stops every thread), so the others name it: its
heartbeat is the stale one. Every process group's collective timeout (init_distributed) is that
bound and a margin, so a collective fails rather than waiting for ever where the watchdog cannot
run.
"""

import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from ..fileio import atomic_write_text

def collective_timeout_s(hang_timeout_s: float) -> float:
    """Every process group's timeout: the watchdog's bound and a margin, so that the watchdog,
    which names the ranks, speaks before a collective fails with a bare timeout."""
    return hang_timeout_s * 1.05 + 5.0


EXIT_HUNG = 124
"""Exit status of a rank the watchdog stopped (as timeout(1)'s)."""

HEARTBEAT_DIR = "heartbeat"

LAUNCHERS = ("deepspeed", "torchrun", "mpirun", "mpiexec", "orterun", "prterun", "orted", "prted")
"""Programs (or python scripts) that start ranks: a rank must not outlive them."""
LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                    "torch.distributed.launch")


def _is_launcher(argv: List[str]) -> bool:
    if not argv:
        return False
    if os.path.basename(argv[0]) in LAUNCHERS:
        return True
    if not os.path.basename(argv[0]).startswith("python"):
        return False
    args = [a for a in argv[1:] if a not in ("-u", "-B", "-O")]
    if args[:1] == ["-m"]:
        return len(args) > 1 and args[1] in LAUNCHER_MODULES
    return bool(args) and os.path.basename(args[0]) in LAUNCHERS


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time (field 22 of /proc/<pid>/stat), which tells a pid's reuse apart;
    None once it has exited (a zombie not yet reaped included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if len(fields) < 20 or fields[0] in ("Z", "X") else fields[19]


def launcher_ancestors() -> List[Tuple[int, str, str]]:
    """(pid, start time, command) of the launcher processes directly above this one, nearest
    first: the chain stops at the first parent that is no launcher (a shell, slurmstepd, a test
    harness), which may come and go as it likes."""
    found, pid = [], os.getppid()
    for _ in range(16):
        if pid <= 1:
            break
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")[:-1]
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if not _is_launcher(argv):
            break
        found.append((pid, _proc_start(pid), " ".join(argv)))
        pid = parent
    return found


class Watchdog:
    """One per rank; `start` at the first step, `stop` at the end of the run."""

    def __init__(self, rank: int, world: int, out_dir: str, timeout_s: float, beat_s: Optional[float] = None) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.dir = os.path.join(out_dir, HEARTBEAT_DIR)
        self.beat_s = beat_s if beat_s is not None else min(5.0, max(0.5, timeout_s / 10))
        self.step, self.phase, self.since = 0, "start", time.time()
        self.launchers = launcher_ancestors()
        self.host, self.start_time = socket.gethostname(), _proc_start(os.getpid())
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def progress(self, step: int, phase: str) -> None:
        self.step, self.phase, self.since = step, phase, time.time()

    def start(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        self.since = time.time()
        self._thread = threading.Thread(target=self._watch, name="s2moe-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            os.remove(self._path(self.rank))
        except OSError:
            pass

    def _path(self, rank: int) -> str:
        return os.path.join(self.dir, f"rank{rank}.json")

    def _watch(self) -> None:
        while not self._stop.wait(self.beat_s):
            now = time.time()
            dead = self._dead_launcher()
            if dead is not None:
                self._end(f"watchdog: rank {self.rank}: its launcher (pid {dead[0]}: {dead[2][:120]}) is gone; "
                          f"stopping at step {self.step} ({self.phase}) instead of training on as an orphan")
            try:
                atomic_write_text(self._path(self.rank), json.dumps(
                    {"rank": self.rank, "host": self.host, "pid": os.getpid(), "start": self.start_time,
                     "step": self.step, "phase": self.phase, "since": self.since, "alive": now}))
            except OSError:
                pass  # a full disk must not end the run from here; the checkpoint writer reports it
            if now - self.since > self.timeout_s:
                message, silent = self._stalled(now)
                self._end(message, [h for h in silent if h.get("host") == self.host])

    def _dead_launcher(self):
        for pid, start, command in self.launchers:
            if _proc_start(pid) != start:
                return pid, start, command
        return None

    def _heard(self) -> Dict[int, dict]:
        heard = {}
        for r in range(self.world):
            try:
                with open(self._path(r)) as f:
                    heard[r] = json.load(f)
            except (OSError, ValueError):
                pass
        return heard

    def _peers(self, now: float):
        """A line per other rank (when it was heard from, at which step and phase, whether its
        process on this host is gone), and the heartbeats of those not responding."""
        lines, silent = [], []
        heard = self._heard()
        for r in range(self.world):
            if r == self.rank:
                continue
            h = heard.get(r)
            if h is None:
                lines.append(f"  rank {r}: never heard from")
                continue
            quiet = now - h["alive"]
            if h.get("host") == self.host and h.get("start") is not None and _proc_start(h["pid"]) != h["start"]:
                state = "gone (its process has exited)"
                silent.append(h)
            elif quiet > 3 * self.beat_s + 2:
                state = f"not responding for {quiet:.0f} s (stopped, hung or dead)"
                silent.append(h)
            else:
                state = f"alive, no progress for {now - h['since']:.0f} s"
            lines.append(f"  rank {r} (host {h['host']}, pid {h['pid']}): {state}, at step {h['step']}, "
                         f"phase '{h['phase']}'")
        if silent:
            lines.append(f"  the rank(s) not responding: {', '.join(str(h['rank']) for h in silent)}")
        return lines, silent

    def _stalled(self, now: float):
        """The message, and the heartbeats of the ranks not responding."""
        lines, silent = self._peers(now)
        head = (f"watchdog: rank {self.rank} made no progress for {now - self.since:.0f} s (hang_timeout_s "
                f"{self.timeout_s:g}) at step {self.step}, phase '{self.phase}'; stopping the job")
        return "\n".join([head, *lines]), silent

    def report_failure(self, error: BaseException) -> None:
        """Before a failed rank's traceback (a collective that lost its peer, most often): where
        this rank was and what became of the others, since launchers name only the rank they saw
        exit first."""
        lines, _ = self._peers(time.time())
        first = (str(error).strip().splitlines() or [""])[0][:300]
        print("\n".join([f"rank {self.rank} failed at step {self.step}, phase '{self.phase}': "
                         f"{type(error).__name__}: {first}", *lines]), file=sys.stderr, flush=True)

    def _end(self, message: str, kill=()) -> None:
        """Print, SIGKILL the stopped ranks of this host (a stopped process ignores the launcher's
        SIGTERM, and launchers wait 30 s before they kill), and end this process."""
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        for h in kill:
            if h.get("pid") and h.get("start") is not None and _proc_start(h["pid"]) == h["start"]:
                try:
                    os.kill(h["pid"], signal.SIGKILL)
                    print(f"watchdog: killed rank {h['rank']} (pid {h['pid']}) on this host", file=sys.stderr,
                          flush=True)
                except OSError:
                    pass
        os._exit(EXIT_HUNG)
