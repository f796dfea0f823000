"""Batched experts (moe.expert_impl 'batched'): the same function as DeepSpeed's loop over local
experts, for the SMoE baseline and S2MoE alike, and the same checkpoint: a run saved with one
implementation resumes with the other and continues exactly. (Expert parallelism with batched
experts: tests/distributed/test_expert_parallel.py.)"""

import os

import pytest
import torch

from s2moe_ds.models import ModelConfig, build_model
from s2moe_ds.moe import expert_blocks
from s2moe_ds.moe.experts import BatchedExperts
from s2moe_ds.train import model_preset

from ..harness import run_distributed
from .test_pretrain import TEXT, _ds_config, _experiment


def _model(block, router, impl, drop_tokens):
    moe = dict(block=block, router=router, num_experts=4, k=2, expert_impl=impl, drop_tokens=drop_tokens)
    return ModelConfig(n_layer=2, d_model=32, n_head=4, d_inner=64, max_seq_len=16, vocab_size=50, moe=moe)


@pytest.mark.parametrize("block,router", [("moe", "topk"), ("s2moe", "topk"), ("s2moe", "xmoe")])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("drop_tokens", [True, False], ids=["capacity", "no-drops"])
def test_batched_experts_equal_the_loop(block, router, train, drop_tokens):
    """Logits, every named loss and every gradient; S2MoE with its noise on (the experts draw no
    random numbers, so both see the same noise)."""
    results = {}
    for impl in ("loop", "batched"):
        torch.manual_seed(0)
        model = build_model(_model(block, router, impl, drop_tokens)).train(train)
        assert all(isinstance(b.router, torch.nn.Module) for b in expert_blocks(model))
        assert any(isinstance(m, BatchedExperts) for m in model.modules()) == (impl == "batched")
        x_BT = torch.randint(0, 50, (6, 16), generator=torch.Generator().manual_seed(1))
        out = model(x_BT, x_BT)
        losses = {name: torch.stack(values).sum() for name, values in out.layer_losses.items()}
        (out.task_loss + sum(losses.values())).backward()
        results[impl] = (out.logits.detach(), {n: v.detach() for n, v in losses.items()},
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (l_logits, l_losses, l_grads), (b_logits, b_losses, b_grads) = results["loop"], results["batched"]
    torch.testing.assert_close(b_logits, l_logits, rtol=1e-5, atol=1e-6)
    assert set(b_losses) == set(l_losses)
    for name in l_losses:
        torch.testing.assert_close(b_losses[name], l_losses[name], rtol=1e-5, atol=1e-6)
    assert set(b_grads) == set(l_grads) and any("deepspeed_experts.3" in n for n in b_grads)
    for name in l_grads:
        torch.testing.assert_close(b_grads[name], l_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_batched_experts_keep_the_parameter_names():
    loop, batched = (build_model(_model("s2moe", "topk", impl, True)) for impl in ("loop", "batched"))
    assert list(loop.state_dict()) == list(batched.state_dict())


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def _train_worker(rank, world_size, text, out_dir, cache, impl, train_kw):
    from s2moe_ds.train import pretrain
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32, moe=dict(num_experts=4, expert_impl=impl))
    experiment = _experiment(model, world_size, text, cache, out_dir=out_dir, seq_len=32, warmup_steps=2,
                             eval_interval=0, save_interval=2, log_interval=1, max_steps=4, **train_kw)
    return pretrain(experiment, _ds_config())


def test_a_checkpoint_resumes_with_the_other_implementation(text_file, tmp_path):
    """2 ranks, ep_size 2: 4 steps batched straight; 2 steps batched, then resumed with the loop
    (and the other way round): the same losses, and the same per-expert files."""
    cache = str(tmp_path / "cache")
    straight = run_distributed(_train_worker, 2, (text_file, str(tmp_path / "s"), cache, "batched", {}))
    for first, second in (("batched", "loop"), ("loop", "batched")):
        out = str(tmp_path / first)
        run_distributed(_train_worker, 2, (text_file, out, cache, first, dict(stop_after=2)))
        resumed = run_distributed(_train_worker, 2, (text_file, out, cache, second, dict(resume=True)))
        for rank in range(2):
            assert len(resumed[rank]["losses"]) == 2
            assert resumed[rank]["losses"] == pytest.approx(straight[rank]["losses"][2:], abs=1e-6)
    files = {impl: sorted(os.listdir(os.path.join(tmp_path, impl, "checkpoints", "step00000004")))
             for impl in ("batched", "loop")}
    assert files["batched"] == files["loop"] and sum("expert_" in f for f in files["loop"]) == 2 * 4
