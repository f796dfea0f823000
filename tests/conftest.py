import hashlib
import os
import platform
import sys


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


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and DS_ACCELERATOR=cuda (bench/gpu_suite.py runs them)")
