"""Faults a test injects into one rank of a real job, to check that the watchdog ends it
(tests/system/test_watchdog.py): S2MOE_INJECT_FAULT=RANK:STEP:KIND makes rank RANK, when its loop
reaches step STEP (its first phase), do KIND:

    gil       hold Python's lock in a C loop that never returns (nothing in the rank runs Python)
    sleep     block in C code that released the lock (the rank's other threads run; its loop not)
    segfault  read address 0 (SIGSEGV)
    abort     os.abort() (SIGABRT)

It prints `injected fault: rank R, step S, phase 'P': KIND at <unix time>` first. Unset, nothing
of this runs beyond one comparison per phase."""

import ctypes
import os
import sys
import time
from typing import Optional

from ..config import ConfigError

ENV = "S2MOE_INJECT_FAULT"


def _hold_the_interpreter_lock() -> None:
    sum(range(10 ** 15))  # one C call: no bytecode boundary, so the lock is never handed on


def _sleep_in_c() -> None:
    while True:
        time.sleep(3600)


def _segfault() -> None:
    ctypes.string_at(0)


KINDS = {"gil": _hold_the_interpreter_lock, "sleep": _sleep_in_c, "segfault": _segfault, "abort": os.abort}


class Fault:
    def __init__(self, rank: int, step: int, kind: str) -> None:
        self.rank, self.step, self.kind = rank, step, kind

    def at(self, step: int, phase: str) -> None:
        if step == self.step:
            self.step = -1  # once
            print(f"injected fault: rank {self.rank}, step {step}, phase '{phase}': {self.kind} at {time.time():.3f}",
                  file=sys.stderr, flush=True)
            KINDS[self.kind]()


def fault_from_env(rank: int) -> Optional[Fault]:
    """The fault S2MOE_INJECT_FAULT asks of this rank, if any."""
    value = os.environ.get(ENV, "")
    if not value:
        return None
    parts = value.split(":")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or parts[2] not in KINDS:
        raise ConfigError(f"{ENV}={value!r} is not RANK:STEP:KIND with KIND one of {', '.join(KINDS)} "
                          f"(e.g. 1:5:segfault); fix it or unset {ENV}")
    return Fault(int(parts[0]), int(parts[1]), parts[2]) if int(parts[0]) == rank else None
