"""One run per out-dir: rank 0 holds an exclusive lock on <out_dir>/LOCK for the run's whole life.

The lock is the kernel's (flock on an open file), so a run that crashes, is killed or is requeued
releases it with its process, and its successor takes it over; the file only records who holds
it (host, pid, start time) for the error a second run prints. Taken after the process group
starts and before anything is read or written, and agreed by every rank, so a refused run stops
on every rank with the holder named, and never touches the first run's checkpoints.
"""

import errno
import fcntl
import json
import os
import socket
import stat
import time
from typing import Optional, Tuple

import deepspeed.comm as dist

from ..config import ConfigError

LOCK = "LOCK"
HELD = (errno.EWOULDBLOCK, errno.EAGAIN)
"""flock's errors that mean another process holds the lock; any other is the file system's."""


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts writes a space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def file_system_of(path: str) -> Tuple[str, str]:
    """(file system type, mount point) of `path`, from /proc/mounts; ('unknown', '?') elsewhere."""
    real = os.path.realpath(path)
    best = ("unknown", "?")
    try:
        with open("/proc/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return best
    length = -1
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape_mount_field(fields[1])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= length:  # the last of equal mount points is the one on top
            best, length = (fields[2], point), len(point)
    return best


def _unsupported(path: str, e: OSError) -> ConfigError:
    fs_type, mount = file_system_of(path)
    name = errno.errorcode.get(e.errno, str(e.errno))
    return ConfigError(
        f"train.out_dir: cannot lock {path}: flock failed with {name} ({e.strerror}) on its {fs_type} file "
        f"system (mounted at {mount}), which does not support locks here. On NFS mount with locking (no "
        "'nolock'; NFSv3 needs lockd/rpc.statd running), on Lustre mount with '-o flock'; or choose an "
        "--out-dir on a file system with locks (docs/checkpoints.md, 'Out-dir locks on NFS and Lustre')")


def _open_lock_file(path: str) -> int:
    """The lock file, opened without following a symbolic link and refused unless it is a regular
    file of its own: the holder record truncates and rewrites it."""
    def refuse(what: str) -> ConfigError:
        return ConfigError(f"train.out_dir: {path} is {what}; the run lock must be a regular file of its own, "
                           "since the run rewrites it: remove that entry (its target is untouched) and run again")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if os.path.islink(path):
            raise refuse(f"a symbolic link (to {os.readlink(path)})") from e
        if e.errno == errno.EISDIR:
            raise ConfigError(f"train.out_dir: the run lock {path} is a folder; remove or rename it (the run "
                              "creates its lock file there) and run again") from e
        raise ConfigError(f"train.out_dir: cannot open the run lock {path}: {e.strerror}; make its folder "
                          "writable or choose another --out-dir") from e
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise refuse("not a regular file" if not stat.S_ISREG(info.st_mode) else
                     f"a hard link shared with {info.st_nlink - 1} other name(s)")
    return fd


class RunLock:
    """Held by rank 0 from `acquire` until the process ends (or `release`)."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None

    def try_acquire(self, out_dir: str) -> Optional[str]:
        """None once held; else a description of the holder. ConfigError when the lock file is
        not a regular file of its own, or its file system has no working flock."""
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, LOCK)
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in HELD:
                os.close(fd)
                raise _unsupported(path, e) from e
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                holder = {}
            os.close(fd)
            return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
                    f"{holder.get('started', '?')}")
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        self.fd = fd
        return None

    def acquire(self, out_dir: str) -> None:
        """Collective: rank 0 takes the lock; every rank raises ConfigError if it is held, or
        cannot be taken (rank 0's reason)."""
        holder, error = None, None
        if dist.get_rank() == 0:
            try:
                holder = self.try_acquire(out_dir)
            except ConfigError as e:
                error = str(e)
        shared = [holder, error]
        dist.broadcast_object_list(shared, src=0)
        if shared[1] is not None:
            raise ConfigError(shared[1])
        if shared[0] is not None:
            raise ConfigError(f"train.out_dir: {out_dir} is in use by another run ({shared[0]}; "
                              f"{os.path.join(out_dir, LOCK)}); wait for it to finish or stop it, or choose "
                              "another --out-dir. Its checkpoints were not touched")

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
