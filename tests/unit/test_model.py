"""The language model: presets, block kinds one flag apart, causality, losses, generation."""

import pytest
import torch

from s2moe_ds.config import ConfigError
from s2moe_ds.models import ModelConfig, build_model
from s2moe_ds.moe import S2MoE, expert_blocks, init_expert_weights, total_loss
from s2moe_ds.parallel import ExpertLayout, ParallelConfig
from s2moe_ds.train import model_preset


def _model(block="s2moe", **kw):
    torch.manual_seed(0)
    cfg = model_preset("tiny", vocab_size=50, moe=dict(block=block, eval_capacity_factor=4.0), **kw)
    return build_model(cfg)


def test_presets_match_the_paper_small_setting():
    cfg = model_preset("paper-small")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_inner) == (4, 256, 8, 512)
    assert (cfg.moe.num_experts, cfg.moe.k, cfg.moe.block, cfg.moe.router) == (16, 2, "s2moe", "topk")
    with pytest.raises(ConfigError, match=r"model\.preset"):
        model_preset("huge")
    with pytest.raises(ConfigError, match=r"model\.n_head: must divide model\.d_model"):
        ModelConfig(d_model=30, n_head=4)


@pytest.mark.parametrize("block,moe_every,n_moe", [("s2moe", 1, 2), ("moe", 2, 1), ("dense", 1, 0)])
def test_block_flag_and_moe_every(block, moe_every, n_moe):
    model = _model(block, moe_every=moe_every)
    assert len(expert_blocks(model)) == n_moe
    assert all(isinstance(m, S2MoE) for m in expert_blocks(model)) == (block == "s2moe" or n_moe == 0)
    x = torch.randint(0, 50, (2, 16))
    out = model(x, x)
    assert out.logits.shape == (2, 16, 50) and out.task_loss > 0
    total, reduced = total_loss(out.task_loss, out.layer_losses, model.cfg.moe.loss_terms())
    assert (reduced.get("balance", torch.zeros(())) > 0) == (n_moe > 0)
    assert (reduced.get("uncertainty", torch.zeros(())) > 0) == (block == "s2moe")
    total.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "mix_gate" not in n or block == "s2moe")


def test_uncertainty_is_averaged_and_balance_summed_over_layers():
    model = _model("s2moe", n_layer=3).train()
    x = torch.randint(0, 50, (2, 16))
    torch.manual_seed(1)
    out = model(x, x)
    per_layer_u, per_layer_b = out.layer_losses["uncertainty"], out.layer_losses["balance"]
    assert len(per_layer_u) == len(per_layer_b) == 3
    total, reduced = total_loss(out.task_loss, out.layer_losses, model.cfg.moe.loss_terms())
    torch.testing.assert_close(reduced["uncertainty"], torch.stack(per_layer_u).mean())
    torch.testing.assert_close(reduced["balance"], torch.stack(per_layer_b).sum())
    torch.testing.assert_close(total, out.task_loss + 0.01 * reduced["balance"] + 0.1 * reduced["uncertainty"])
    # The reductions are configuration: sum the uncertainty losses instead.
    summed = model_preset("tiny", moe=dict(block_config=dict(uncertainty_over_layers="sum"), balance_over_layers="mean"))
    _, reduced = total_loss(out.task_loss, out.layer_losses, summed.moe.loss_terms())
    torch.testing.assert_close(reduced["uncertainty"], torch.stack(per_layer_u).sum())
    torch.testing.assert_close(reduced["balance"], torch.stack(per_layer_b).mean())


def test_eval_is_causal_and_deterministic():
    model = _model().eval()
    x = torch.randint(0, 50, (1, 24))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 7) % 50
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4
    torch.testing.assert_close(model(x).logits, a, rtol=0, atol=0)


def test_masked_targets_are_left_out_of_the_loss():
    model = _model().eval()
    x = torch.randint(0, 50, (2, 16))
    mask = torch.ones(2, 16)
    mask[1] = 0
    full = model(x[:1], x[:1]).task_loss
    torch.testing.assert_close(model(x, x, mask).task_loss, full)


def test_expert_init_is_the_same_for_any_expert_parallel_layout():
    one = _model("moe")
    init_expert_weights(one, seed=3, layout=ExpertLayout(num_experts=4))
    torch.manual_seed(0)
    cfg = model_preset("tiny", vocab_size=50, moe=dict(block="moe", num_experts=4))
    half = build_model(cfg, ParallelConfig(ep_size=2))
    init_expert_weights(half, seed=3, layout=ExpertLayout(num_experts=4, ep_size=2, ep_rank=1))  # experts 2, 3
    e_full = expert_blocks(one)[1].local_experts()
    e_half = expert_blocks(half)[1].local_experts()
    assert len(e_half) == 2
    torch.testing.assert_close(e_half[0].fc1.weight, e_full[2].fc1.weight)
    torch.testing.assert_close(e_half[1].fc2.weight, e_full[3].fc2.weight)
    assert (e_full[0].fc1.weight - e_full[1].fc1.weight).abs().max() > 0


def test_generate_extends_the_prompt_reproducibly():
    model = _model().eval()
    prompt = torch.randint(0, 50, (1, 5))
    a = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, 15) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)
