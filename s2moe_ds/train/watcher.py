"""The watchdog's side process: one per rank, outside the rank's interpreter.

A rank's interpreter can freeze in ways no thread of its own survives: code that holds Python's
lock and never returns (a C loop, a C extension that blocks without releasing it), a SIGSTOP, a
crash. So each rank starts this process (watchdog.Watchdog.start) and tells it, through a small
block of shared memory, where its training loop is (step, phase, when it got there) and when its
interpreter last ran (a pulse thread, which cannot run while another thread holds the lock). This
process, every few seconds, writes the rank's heartbeat (<out_dir>/heartbeat/rank<r>.json) and

* ends the job when the rank made no progress for `timeout_s`: a rank whose interpreter still runs
  (it waits in a collective for a rank that never comes, or in C code that released the lock)
  prints which ranks were heard from when, kills the ranks on this host that are not responding,
  and exits with EXIT_HUNG; a rank whose interpreter does not run prints the same, its threads'
  stacks (faulthandler), and is killed a few seconds later if no other rank's watcher did it first;
* ends the rank when a launcher above it died (no orphan trains on);
* says which rank went, at which step and phase, when the rank's process ended without finishing
  its run (a segfault, an abort, a kill): the launcher then ends the others.

Per rank rather than per node: each rank starts its own as a child, so no election among the
ranks of a node, no discovery of the others' processes, the same under every launcher (srun starts
the ranks of a node independently), and no node-wide watcher that dies with the rank that started it.
It ends with its rank: the rank tells it (shared flag, then EOF on a pipe) when its run ends, and it
checks every beat that the rank's process (pid and start time) still exists. Standard library
only, started with `python -I -S` on this file, so it imports neither torch nor the package.
"""

import argparse
import json
import mmap
import os
import select
import signal
import socket
import struct
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

EXIT_HUNG = 124
"""Exit status of a rank the watchdog stopped (as timeout(1)'s)."""

HEARTBEAT_DIR = "heartbeat"

DUMP_SIGNAL = signal.SIGRTMIN + 3
"""Sent to a rank whose interpreter does not run, before it is killed: faulthandler, registered for
it in the rank, prints every thread's stack from C, without Python's lock."""

LAUNCHERS = ("deepspeed", "torchrun", "mpirun", "mpiexec", "orterun", "prterun", "orted", "prted")
"""Programs (or python scripts) that start ranks: a rank must not outlive them."""
LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                    "torch.distributed.launch")


def beat_seconds(timeout_s: float) -> float:
    """How often the heartbeat is written (and the rank checked)."""
    return min(5.0, max(0.5, timeout_s / 10))


def pulse_seconds(beat_s: float) -> float:
    """How often the rank's pulse thread runs (and looks for the watcher's verdict)."""
    return min(1.0, beat_s / 2)


def quiet_limit(beat_s: float) -> float:
    """A rank whose heartbeat's pulse is older is 'not responding' (to the others, who read it
    from the file its watcher rewrites every beat)."""
    return 3 * beat_s + 2


def own_quiet_limit(beat_s: float) -> float:
    """A rank whose pulse is older does not run Python (to its own watcher, which reads the pulse
    from memory)."""
    return 4 * pulse_seconds(beat_s) + 1


# ------------------------------------------------------------------------------------ processes

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


def _stat_fields(pid: int) -> Optional[List[str]]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_start(pid: int) -> Optional[str]:
    """The process's start time (field 22 of /proc/<pid>/stat), which tells a pid's reuse apart;
    None once it has exited (a zombie not yet reaped included)."""
    fields = _stat_fields(pid)
    return None if fields is None or len(fields) < 20 or fields[0] in ("Z", "X") else fields[19]


def proc_state(pid: int) -> str:
    """The kernel's one-letter state of the process (R running, S sleeping, D in an uninterruptible
    wait, T stopped, Z exited), '?' when unknown."""
    fields = _stat_fields(pid)
    return fields[0] if fields else "?"


STATES = {"R": "running C code that holds Python's lock", "S": "blocked while holding Python's lock",
          "D": "in an uninterruptible wait (a file system, a device)", "T": "stopped (SIGSTOP or a debugger)",
          "t": "stopped by a debugger", "Z": "exited", "X": "exited"}


def launcher_ancestors(pid: Optional[int] = None) -> List[Tuple[int, str, str]]:
    """(pid, start time, command) of the launcher processes directly above process `pid` (this
    one by default), nearest first: the chain stops at the first parent that is no launcher (a
    shell, slurmstepd, a test harness), which may come and go as it likes."""
    fields = _stat_fields(os.getpid() if pid is None else pid)
    found, pid = [], (int(fields[1]) if fields else 1)
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
        found.append((pid, proc_start(pid), " ".join(argv)))
        pid = parent
    return found


# ------------------------------------------------------------------------------ shared memory

class SharedState:
    """What the rank tells its watcher, in a 256-byte shared mapping: the loop's progress (step,
    phase, since), written under a sequence counter so that a reader never takes half of one
    update; the pulse (when the rank's interpreter last ran); finished (the run ended on its own);
    verdict (from the watcher: the exit status the rank is to end with)."""

    SIZE = 256
    _PROGRESS = struct.Struct("=qd128s")  # step, since, phase (UTF-8, NUL-padded)
    _SEQ, _AT, _PULSE, _FINISHED, _VERDICT = 0, 8, 160, 168, 172

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.map = mmap.mmap(fd, self.SIZE)
        self._seq = 0

    @classmethod
    def create(cls) -> "SharedState":
        """A new block, in memory only (memfd: nothing on disk to clean up, freed with its last user)."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("s2moe-watchdog")
        else:  # an unlinked temporary file
            fd, path = tempfile.mkstemp(prefix="s2moe-watchdog.")
            os.unlink(path)
        os.ftruncate(fd, cls.SIZE)
        return cls(fd)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    def write_progress(self, step: int, phase: str, since: float) -> None:
        encoded = phase.encode("utf-8", "replace")[:128]
        struct.pack_into("=Q", self.map, self._SEQ, self._seq + 1)  # odd: an update is under way
        self._PROGRESS.pack_into(self.map, self._AT, step, since, encoded)
        self._seq += 2
        struct.pack_into("=Q", self.map, self._SEQ, self._seq)

    def write_pulse(self, now: float) -> None:
        struct.pack_into("=d", self.map, self._PULSE, now)

    def set_finished(self) -> None:
        struct.pack_into("=i", self.map, self._FINISHED, 1)

    def set_verdict(self, status: int) -> None:
        struct.pack_into("=i", self.map, self._VERDICT, status)

    def verdict(self) -> int:
        return struct.unpack_from("=i", self.map, self._VERDICT)[0]

    def read(self) -> Dict[str, object]:
        """step, phase, since, pulse, finished, verdict."""
        progress = None
        for _ in range(50):  # a rank stopped mid-update leaves the counter odd: then the last read
            before = struct.unpack_from("=Q", self.map, self._SEQ)[0]
            fields = self._PROGRESS.unpack_from(self.map, self._AT)
            if before % 2 == 0 and struct.unpack_from("=Q", self.map, self._SEQ)[0] == before:
                progress = fields
                break
            time.sleep(0.001)
        step, since, phase = progress if progress is not None else fields
        pulse, = struct.unpack_from("=d", self.map, self._PULSE)
        finished, verdict = struct.unpack_from("=ii", self.map, self._FINISHED)
        return {"step": step, "since": since, "phase": phase.rstrip(b"\0").decode("utf-8", "replace"),
                "pulse": pulse, "finished": bool(finished), "verdict": verdict}


# ------------------------------------------------------------------------------- heartbeats

def heartbeat_path(folder: str, rank: int) -> str:
    return os.path.join(folder, f"rank{rank}.json")


def write_heartbeat(folder: str, rank: int, beat: Dict[str, object]) -> None:
    """Atomically (a reader sees the old beat or the new one); not flushed to disk: it is rewritten
    every few seconds, and the dead have no use for it."""
    path = heartbeat_path(folder, rank)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError:
        return  # a full disk must not end the run from here; the checkpoint writer reports it
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(beat, f)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def read_heartbeats(folder: str, world: int) -> Dict[int, dict]:
    heard = {}
    for r in range(world):
        try:
            with open(heartbeat_path(folder, r)) as f:
                heard[r] = json.load(f)
        except (OSError, ValueError):
            pass
    return heard


def peer_lines(folder: str, rank: int, world: int, host: str, beat_s: float, now: float):
    """A line per other rank (when it was heard from, at which step and phase, whether its process
    on this host is gone), and the heartbeats of those not responding."""
    lines, silent = [], []
    heard = read_heartbeats(folder, world)
    for r in range(world):
        if r == rank:
            continue
        h = heard.get(r)
        if h is None:
            lines.append(f"  rank {r}: never heard from")
            continue
        quiet = now - h["alive"]
        if h.get("host") == host and h.get("start") is not None and proc_start(h["pid"]) != h["start"]:
            state = "gone (its process has exited)"
            silent.append(h)
        elif quiet > quiet_limit(beat_s):
            unheard = now - h.get("checked", h["alive"])
            why = (STATES.get(h.get("state"), "stopped, hung or dead") if unheard <= quiet_limit(beat_s)
                   else "stopped, hung or dead; its watcher is silent too")
            state = f"not responding for {quiet:.0f} s ({why})"
            silent.append(h)
        else:
            state = f"alive, no progress for {now - h['since']:.0f} s"
        lines.append(f"  rank {r} (host {h['host']}, pid {h['pid']}): {state}, at step {h['step']}, "
                     f"phase '{h['phase']}'")
    if silent:
        lines.append(f"  the rank(s) not responding: {', '.join(str(h['rank']) for h in silent)}")
    return lines, silent


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _alive(pid: int, start: Optional[str]) -> bool:
    return start is not None and proc_start(pid) == start


def kill_ranks(beats: List[dict], host: str, dump: bool = True) -> None:
    """SIGKILL the ranks of this host among `beats` (a stopped process ignores the SIGTERM that
    launchers send, and they wait 30 s before they kill), after their stacks were printed (`dump`;
    not again for a rank whose own watcher printed them)."""
    mine = [h for h in beats if h.get("host") == host and h.get("pid") and _alive(h["pid"], h.get("start"))]
    unseen = [h for h in mine if not h.get("stacks")] if dump else []
    for h in unseen:
        try:
            os.kill(h["pid"], DUMP_SIGNAL)
        except OSError:
            pass
    if unseen:
        time.sleep(0.5)
    for h in mine:
        if _alive(h["pid"], h.get("start")):
            try:
                os.kill(h["pid"], signal.SIGKILL)
                say(f"watchdog: killed rank {h['rank']} (pid {h['pid']}) on this host")
            except OSError:
                pass


# ------------------------------------------------------------------------------- the watcher

class Watcher:
    """Watches one rank (process `pid`, started at `start`) from outside it."""

    def __init__(self, rank: int, world: int, folder: str, timeout_s: float, beat_s: float, pid: int,
                 start: str, state: SharedState, wake_fd: Optional[int]) -> None:
        self.rank, self.world, self.folder, self.timeout_s, self.beat_s = rank, world, folder, timeout_s, beat_s
        self.pid, self.start, self.state, self.wake_fd = pid, start, state, wake_fd
        self.host = socket.gethostname()
        self.launchers = launcher_ancestors(pid)
        self.frozen_since: Optional[float] = None

    def run(self) -> int:
        while True:
            self._wait(self.beat_s)
            now, s = time.time(), self.state.read()
            if s["finished"]:
                return 0
            if not _alive(self.pid, self.start):
                self._beat(s, now)  # the others read where it ended
                if not s["verdict"] and self.frozen_since is None:  # else it was named, and killed
                    say(f"watchdog: rank {self.rank} (host {self.host}, pid {self.pid}) is gone at step "
                        f"{s['step']}, phase '{s['phase']}', without finishing its run (it crashed or was "
                        "killed: its last output or the launcher's says which)")
                return 0
            dead = self._dead_launcher()
            if dead is not None:
                say(f"watchdog: rank {self.rank}: its launcher (pid {dead[0]}: {dead[2][:120]}) is gone; "
                    f"stopping at step {s['step']} ({s['phase']}) instead of training on as an orphan")
                return self._end_rank()
            self._beat(s, now)
            if now - s["since"] <= self.timeout_s:
                self.frozen_since = None
            elif now - s["pulse"] <= own_quiet_limit(self.beat_s):
                lines, silent = peer_lines(self.folder, self.rank, self.world, self.host, self.beat_s, now)
                say("\n".join([self._head(s, now), *lines]))
                # It exits before the others are killed, so its collective does not fail first.
                self._end_rank()
                kill_ranks(silent, self.host)
                return 0
            elif self._frozen(s, now):
                return 0

    def _wait(self, seconds: float) -> None:
        """Sleep, woken early when the rank ends (it closes the pipe's other end, or dies)."""
        if self.wake_fd is None:
            time.sleep(seconds)
            return
        ready, _, _ = select.select([self.wake_fd], [], [], seconds)
        if ready and not os.read(self.wake_fd, 64):
            os.close(self.wake_fd)  # EOF: every writer is gone; poll from now on
            self.wake_fd = None

    def _beat(self, s: Dict[str, object], now: float) -> None:
        write_heartbeat(self.folder, self.rank, {
            "rank": self.rank, "host": self.host, "pid": self.pid, "start": self.start, "step": s["step"],
            "phase": s["phase"], "since": s["since"], "alive": s["pulse"], "checked": now,
            "state": proc_state(self.pid), "watcher": os.getpid(), "stacks": self.frozen_since is not None})

    def _head(self, s: Dict[str, object], now: float) -> str:
        return (f"watchdog: rank {self.rank} made no progress for {now - s['since']:.0f} s (hang_timeout_s "
                f"{self.timeout_s:g}) at step {s['step']}, phase '{s['phase']}'; stopping the job")

    def _frozen(self, s: Dict[str, object], now: float) -> bool:
        """The rank's interpreter does not run: say so and print its stacks at once, then leave the
        other ranks' watchers a few beats to name it (their message says who waited for whom) before
        killing it. True once it is ended."""
        if self.frozen_since is None:
            self.frozen_since = now
            lines, _ = peer_lines(self.folder, self.rank, self.world, self.host, self.beat_s, now)
            state = proc_state(self.pid)
            say("\n".join([self._head(s, now), f"  rank {self.rank} itself (host {self.host}, pid {self.pid}): its "
                           f"interpreter has not run for {now - s['pulse']:.0f} s ({STATES.get(state, state)}); "
                           "its threads' stacks follow", *lines]))
            try:
                os.kill(self.pid, DUMP_SIGNAL)
            except OSError:
                pass
            self._beat(s, now)  # "stacks": the others' watchers need not print them again
            return False
        if now - self.frozen_since < 2 * self.beat_s + 1:
            return False
        self._end_rank(dump=False)
        return True

    def _end_rank(self, dump: bool = True) -> int:
        """The rank exits with EXIT_HUNG (its pulse thread reads the verdict); killed if it cannot
        (after its stacks were printed, unless `dump` is False: they were)."""
        self.state.set_verdict(EXIT_HUNG)
        deadline = time.time() + 2 * pulse_seconds(self.beat_s) + 1
        while time.time() < deadline and _alive(self.pid, self.start):
            time.sleep(0.05)
        if _alive(self.pid, self.start):
            kill_ranks([{"rank": self.rank, "host": self.host, "pid": self.pid, "start": self.start}], self.host, dump)
        return 0

    def _dead_launcher(self):
        for pid, start, command in self.launchers:
            if proc_start(pid) != start:
                return pid, start, command
        return None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="the watchdog of one rank (started by the rank itself)")
    for name, kind in (("rank", int), ("world", int), ("dir", str), ("timeout", float), ("beat", float),
                       ("pid", int), ("start", str), ("state-fd", int), ("wake-fd", int)):
        p.add_argument("--" + name, type=kind, required=True)
    a = p.parse_args(argv)
    # Ctrl-C, SIGTERM (preemption; launchers send it to a rank's whole process tree) and SLURM's
    # pre-timeout SIGUSR1 are for the rank, which may checkpoint first: this process watches it
    # to its end, which is its own (SIGKILL, which launchers send 30 s later, ends both).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    watcher = Watcher(a.rank, a.world, a.dir, a.timeout, a.beat, a.pid, a.start, SharedState(a.state_fd), a.wake_fd)
    return watcher.run()


if __name__ == "__main__":
    sys.exit(main())
