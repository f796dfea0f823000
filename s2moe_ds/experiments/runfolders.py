"""Who owns a run folder: the rule every comparison and study follows before it writes into one.

A run folder is started only when it is new, or when it was started by the same command (as
recorded in its command.json or result.json) and no process holds its lock. A folder whose
recorded command differs, that records no command, or whose lock is held is refused with a
ConfigError naming the folder, the difference and the fix: it is never removed or overwritten,
so two comparisons (or a comparison and a hand-started run) on one --out cannot destroy a run.
"""

import errno
import fcntl
import json
import os
from typing import Dict, List, Optional, Sequence

from ..config import ConfigError
from ..fileio import atomic_write_text

COMMAND_FILE = "command.json"
"""The command a harness or study started the folder's run with, written before it starts."""
LOCK_FILE = "LOCK"
"""The training run's lock file (s2moe_ds/train/lock.py): flock-ed for the run's whole life."""


def lock_holder(run_dir: str) -> Optional[str]:
    """A description of the process holding the run's lock, or None when nobody holds it. Probes
    with a shared, non-blocking flock on a read-only descriptor, released at once: the holder
    record is never written, and a run starting in the same instant at worst sees the lock taken
    and stops with its own message, touching nothing."""
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file (or a link or folder there, which no run can hold either)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None  # a file system without flock: the run itself refuses to start there
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except ValueError:
            holder = {}
        return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('started', '?')}"
    finally:
        os.close(fd)  # closing the descriptor releases a shared lock taken above
    return None


def flag_values(command: Sequence[str]) -> Dict[str, List[str]]:
    """{'--flag': [values...]} of an argument list; words before the first flag under ''."""
    out: Dict[str, List[str]] = {}
    key = ""
    for word in command:
        if word.startswith("--"):
            key = word.split("=", 1)[0]
            out.setdefault(key, [])
            if "=" in word:
                out[key].append(word.split("=", 1)[1])
        else:
            out.setdefault(key, []).append(word)
    return out


def flag_difference(recorded: Sequence[str], wanted: Sequence[str]) -> List[str]:
    """One line per flag whose values differ between two commands, e.g.
    "--max-steps: recorded 4, now 8"; a flag missing on one side reads '(absent)'."""
    old, new = flag_values(recorded), flag_values(wanted)
    lines = []
    for key in sorted(set(old) | set(new), key=lambda k: (k != "", k)):
        if old.get(key) != new.get(key):
            show = lambda v: " ".join(v) if v is not None else "(absent)"  # noqa: E731
            name = key or "(the program)"
            lines.append(f"{name}: recorded {show(old.get(key)) or '(set)'}, now {show(new.get(key)) or '(set)'}")
    return lines or ["(the same flags in another order)"]


def recorded_command(run_dir: str) -> Optional[List[str]]:
    """The command the folder's run was started with, from command.json or result.json."""
    for name in (COMMAND_FILE, "result.json"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    command = json.load(f).get("command")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(command, list):
                return [str(w) for w in command]
    return None


def read_record(run_dir: str) -> Dict:
    """command.json as a dict ({} when there is none or it cannot be read)."""
    try:
        with open(os.path.join(run_dir, COMMAND_FILE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_record(run_dir: str, record: Dict) -> None:
    """command.json, written atomically (a reader sees the old record or the new one)."""
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_text(os.path.join(run_dir, COMMAND_FILE), json.dumps(record, indent=2) + "\n")


def check_run_folder(run_dir: str, command: Sequence[str], flag: str = "--out", running_ok: bool = False) -> bool:
    """Whether `run_dir` may be started (or continued) with `command`: True when it holds
    something of that same command, False when it is new or empty. Raises ConfigError (nothing
    removed) when its lock is held, or when it records another command or none. `running_ok`:
    a run of this same command may hold the lock (a study's own job, which it leaves alone)."""
    if not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return False
    holder = lock_holder(run_dir)
    if holder is not None and not (running_ok and recorded_command(run_dir) == list(command)):
        raise ConfigError(f"{flag}: run folder {run_dir} is in use by a training run ({holder}; "
                          f"{os.path.join(run_dir, LOCK_FILE)}); wait for it to finish or stop it, or pass another "
                          f"{flag}. Nothing in it was touched")
    recorded = recorded_command(run_dir)
    if recorded is None:
        raise ConfigError(f"{flag}: run folder {run_dir} holds files but records no command ({COMMAND_FILE} or "
                          f"result.json): it is not a run of this command, so it is not overwritten; pass another "
                          f"{flag}, or remove that folder yourself")
    if list(recorded) != list(command):
        diff = "; ".join(flag_difference(recorded, command))
        raise ConfigError(f"{flag}: run folder {run_dir} holds a run of another command ({diff}); it is not "
                          f"removed or overwritten: pass another {flag}, or remove that folder yourself to rerun it")
    return True
