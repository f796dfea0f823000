import os
import tempfile

# Before anything imports deepspeed: tests run on the CPU accelerator (gloo) even on a GPU box,
# and JIT builds land in a directory of this run only (never a stale build from another venv
# or CPU). Spawned ranks inherit both.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="s2moe-torch-ext-"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and DS_ACCELERATOR=cuda (bench/gpu_suite.py runs them)")
