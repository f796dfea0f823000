"""One run per out-dir: rank 0 holds an exclusive lock on <out_dir>/LOCK for the run's whole life.

The lock is the kernel's (flock on an open file), so a run that crashes, is killed or is requeued
releases it with its process, and its successor takes it over; the file only records who holds
it (host, pid, start time) for the error a second run prints. Taken after the process group
starts and before anything is read or written, and agreed by every rank, so a refused run stops
on every rank with the holder named, and never touches the first run's checkpoints.
"""

import fcntl
import json
import os
import socket
import time
from typing import Optional

import deepspeed.comm as dist

from ..config import ConfigError

LOCK = "LOCK"


class RunLock:
    """Held by rank 0 from `acquire` until the process ends (or `release`)."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None

    def try_acquire(self, out_dir: str) -> Optional[str]:
        """None once held; else a description of the holder."""
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
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
        """Collective: rank 0 takes the lock; every rank raises ConfigError if it is held."""
        holder = self.try_acquire(out_dir) if dist.get_rank() == 0 else None
        shared = [holder]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None:
            raise ConfigError(f"train.out_dir: {out_dir} is in use by another run ({shared[0]}; "
                              f"{os.path.join(out_dir, LOCK)}); wait for it to finish or stop it, or choose "
                              "another --out-dir. Its checkpoints were not touched")

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
