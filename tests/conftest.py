import hashlib
import os
import platform
import sys

import pytest


def _extensions_dir() -> str:
    """JIT builds (DeepSpeed's CPU Adam, its shm comm) kept inside the venv and keyed by the CPU's
    flags: built once per venv and machine kind, never a stale build from another venv or CPU
    (torch's own check covers the sources, not the instruction set they were compiled for)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    key = hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]
    return os.path.join(sys.prefix, "torch-extensions", key)


# Before anything imports deepspeed: tests run on the CPU accelerator (gloo) even on a GPU box.
# Spawned ranks inherit both.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", _extensions_dir())
os.environ.setdefault("OMP_NUM_THREADS", "1")


TIERS = ("unit", "distributed", "system")
"""The test tiers, one folder each (tests/<tier>/); README.md says what each covers. `make test-fast`
runs the first two, `make test` all three."""


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and DS_ACCELERATOR=cuda (bench/gpu_suite.py runs them)")
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: a test of tests/{tier}/ (the folder sets it)")


def pytest_collection_modifyitems(config, items):
    # The folder is the tier, so `-m unit` selects what tests/unit/ holds and a test can't be
    # filed in one tier and marked as another.
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        tier = os.path.relpath(str(item.path), here).split(os.sep)[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
