"""Run a function on N gloo processes, the way DeepSpeed's own distributed tests do.

    results = run_distributed(fn, world_size=2, args=(...))

`fn(rank, world_size, *args)` must be a module-level function (it is pickled by name into spawned
processes). Each rank gets MASTER_ADDR/PORT (a free port), RANK, LOCAL_RANK and WORLD_SIZE, starts
DeepSpeed's process group without the unused shared-memory comm build, and returns a value that
comes back to the caller (tensors included), in rank order. A rank that raises fails the test with
that rank's traceback; ranks still running are stopped. A run past `timeout` is killed and reported
with the ranks that had not finished.

Ranks are forked from a forkserver that has imported torch, DeepSpeed and s2moe_ds once per test
session (a rank still starts as a fresh process that has run nothing else), instead of each rank
of each call importing them anew (seconds of CPU per rank). A test that changed a variable those
imports read (monkeypatch.setenv of torch's kernel pins, say: _READ_AT_IMPORT) gets freshly spawned
ranks, as before.
"""

import io
import os
import queue as queue_mod
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, List, Sequence

import torch
import torch.multiprocessing as mp
from multiprocessing import reduction

from s2moe_ds.parallel import free_port

# What the forkserver imports before forking any rank: what every rank imports anyway.
_PRELOAD = ["torch", "deepspeed", "deepspeed.comm", "s2moe_ds.parallel", "s2moe_ds.train", "s2moe_ds.checkpoint"]
# What torch (ATen, its OpenMP, MKL and oneDNN), numpy's OpenBLAS, DeepSpeed and s2moe_ds may read
# as the forkserver imports them, and a forked rank would not read again. Other variables (the
# rendezvous, or what libraries such as scikit-learn set as tests import them) reach every rank
# through _worker and need no fresh interpreter.
_READ_AT_IMPORT = ("ATEN_", "MKL_", "OMP_", "GOMP_", "OPENBLAS_", "DNNL_", "ONEDNN_", "TORCH_", "DS_", "S2MOE_")


def _environment():
    return {k: v for k, v in os.environ.items() if k.startswith(_READ_AT_IMPORT)}


_BASE_ENV = _environment()  # the session's environment (tests/conftest.py has set its defaults)


def _context():
    """The forkserver when what is read at import is as in the session's environment, so the server
    (started by the first such call) imported everything under it; spawn when a test changed it,
    since a forked rank keeps whatever its server read at import (torch's kernel pins, say)."""
    if _environment() != _BASE_ENV:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _adopt(out, err) -> None:
    """In a rank, as its arguments are unpickled: make the caller's stdout and stderr its own."""
    for wrapper, target in ((out, 1), (err, 2)):
        fd = wrapper.detach()
        if fd != target:  # spawn hands down the same numbers; a forkserver, copies
            os.dup2(fd, target)
            os.close(fd)


class _CallersStdio:
    """Pickled into a rank as the caller's fds 1 and 2 at start, where a spawned rank would have
    inherited them: a forked rank would write to whatever its server inherited (the capture of the
    test that started it) and capfd would not see the rank's output."""

    def __reduce__(self):
        return _adopt, (reduction.DupFd(1), reduction.DupFd(2))


class DistributedTestError(AssertionError):
    pass


@contextmanager
def counting_all_to_all():
    """Counts deepspeed.comm.all_to_all_single calls (the MoE dispatch's collective) made inside
    the block: yields a dict whose 'n' is the count so far (set it to 0 to restart)."""
    import deepspeed.comm as dist
    calls = {"n": 0}
    original = dist.all_to_all_single

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    dist.all_to_all_single = counting
    try:
        yield calls
    finally:
        dist.all_to_all_single = original


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: Sequence, results, timeout: float,
            env: dict, stdio: Any) -> None:  # stdio: None once _adopt has run
    os.environ.clear()  # a forked rank has its server's environment: make it the caller's, as spawn does
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    try:
        import deepspeed.comm as ds_comm
        from s2moe_ds.parallel import init_distributed
        init_distributed(timeout_s=timeout)
        value = fn(rank, world_size, *args)
        buf = io.BytesIO()
        # Bytes, not tensors, cross the queue: a shared-memory tensor would die with this process.
        torch.save(value, buf)
        results.put((rank, "ok", buf.getvalue()))
        ds_comm.barrier()
        ds_comm.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable, world_size: int = 2, args: Sequence = (), timeout: float = 240.0) -> List[Any]:
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, tuple(args), results, timeout, env,
                                            _CallersStdio()), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    got = {}
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(got))
                raise DistributedTestError(f"timed out after {timeout:.0f} s; ranks {missing} did not finish")
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead:
                    # Drain what is in flight, then report the first rank that died silently.
                    time.sleep(0.5)
                    if results.empty():
                        raise DistributedTestError(
                            f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a result")
                continue
            if status == "error":
                raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{payload}")
            got[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        for p in procs:
            p.join(timeout=max(5.0, deadline - time.monotonic()))
        return [got[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
