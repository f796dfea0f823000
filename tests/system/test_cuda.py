"""What only a GPU shows: bf16 training through DeepSpeed with NCCL on one GPU, the fused S2MoE
paths and the batched experts on CUDA against their references. Marked `cuda`: skipped without a
GPU (and under this suite's CPU default, DS_ACCELERATOR=cpu); bench/gpu_suite.py runs them with
DS_ACCELERATOR=cuda."""

import json
import os
import subprocess
import sys

import pytest
import torch

from s2moe_ds.moe import FFN, S2MoE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.cuda


def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if os.environ.get("DS_ACCELERATOR") != "cuda":
        pytest.skip("DS_ACCELERATOR is not 'cuda' (bench/gpu_suite.py sets it)")


def _wired(layer):
    from s2moe_ds.parallel import init_distributed
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29617")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    init_distributed()
    layer.set_deepspeed_parallelism()
    return layer


def _layer_grads(layer, x, seed):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    out, l_aux, _ = layer(x)
    (out.float().square().mean() + l_aux.float()).backward()
    return out.detach().float(), x.grad.float(), {n: p.grad.float().clone() for n, p in layer.named_parameters()
                                                  if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("what", ["fused", "batched"])
def test_fast_paths_equal_their_references_on_cuda(what, dtype):
    """S2MoE's fused autograd Functions against the plain formulas, and batched experts against
    DeepSpeed's loop, on the GPU: outputs, input and parameter gradients."""
    _need_cuda()
    results = []
    for fast in (False, True):
        torch.manual_seed(0)
        kw = {"fused": fast} if what == "fused" else {"fused": True}
        layer = S2MoE(256, FFN(256, 512), num_experts=8, k=2, **kw).cuda().to(dtype)
        if what == "batched" and fast:
            layer.use_expert_impl("batched")
        _wired(layer).train()
        x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(1)).cuda().to(dtype)
        results.append(_layer_grads(layer, x, seed=3))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    (r_out, r_x, r_g), (f_out, f_x, f_g) = results
    torch.testing.assert_close(f_out, r_out, **tol)
    torch.testing.assert_close(f_x, r_x, **tol)
    for name in r_g:
        torch.testing.assert_close(f_g[name], r_g[name], **tol, msg=name)


def test_bf16_training_through_deepspeed_with_nccl(tmp_path):
    """The launcher's path on one GPU: deepspeed launcher, NCCL, ZeRO-2, bf16 ('auto' turns it on);
    the loss falls and the checkpoint evaluates."""
    _need_cuda()
    out = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cuda"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29631",
           os.path.join(ROOT, "launch", "pretrain.py"), "--deepspeed_config", os.path.join(ROOT, "ds_configs", "zero2.json"),
           "--preset", "tiny", "--max-steps", "60", "--eval-interval", "60", "--save-interval", "60",
           "--out-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "run_config.json").read_text())
    assert record["deepspeed"]["bf16"]["enabled"] is True
    assert "nccl" in (proc.stdout + proc.stderr).lower()
    evaluated = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), "--checkpoint", str(out),
                                "--splits", "valid", "--eval-k", "1", "2", "--out-dir", str(tmp_path / "eval")],
                               capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    assert all(r["bpc"] < 6.0 for r in results)  # well below the 8 bits of a uniform byte
