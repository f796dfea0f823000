"""The language model: presets, routers one flag apart, causality, losses, generation."""

import pytest
import torch

from s2moe_ds.config import ConfigError, ModelConfig, model_preset
from s2moe_ds.models import LanguageModel
from s2moe_ds.moe import S2MoE


def _model(router="s2moe", **kw):
    torch.manual_seed(0)
    cfg = model_preset("tiny", vocab_size=50, moe=dict(router=router, eval_capacity_factor=4.0), **kw)
    return LanguageModel(cfg)


def test_presets_match_the_paper_small_setting():
    cfg = model_preset("paper-small")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_inner) == (4, 256, 8, 512)
    assert (cfg.moe.num_experts, cfg.moe.k, cfg.moe.router) == (16, 2, "s2moe")
    with pytest.raises(ConfigError, match=r"model\.preset"):
        model_preset("huge")
    with pytest.raises(ConfigError, match=r"model\.n_head: must divide model\.d_model"):
        ModelConfig(d_model=30, n_head=4)


@pytest.mark.parametrize("router,moe_every,n_moe", [("s2moe", 1, 2), ("smoe", 2, 1), ("dense", 1, 0)])
def test_router_flag_and_moe_every(router, moe_every, n_moe):
    model = _model(router, moe_every=moe_every)
    assert len(model.moe_layers()) == n_moe
    assert all(isinstance(m, S2MoE) for m in model.moe_layers()) == (router == "s2moe" or n_moe == 0)
    x = torch.randint(0, 50, (2, 16))
    out = model(x, x)
    assert out.logits.shape == (2, 16, 50) and out.task_loss > 0
    assert (out.balance_loss > 0) == (n_moe > 0)
    assert (out.uncertainty_loss > 0) == (router == "s2moe")
    out.total(0.01, 0.1).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "mix_gate" not in n or router == "s2moe")


def test_uncertainty_is_averaged_and_balance_summed_over_layers():
    model = _model("s2moe", n_layer=3).train()
    x = torch.randint(0, 50, (2, 16))
    torch.manual_seed(1)
    out = model(x, x)
    layers = model.moe_layers()
    per_layer_u = [m.last_metrics["uncertainty_loss"] for m in layers]
    per_layer_b = [m.last_metrics["balance_loss"] for m in layers]
    torch.testing.assert_close(out.uncertainty_loss.detach(), torch.stack(per_layer_u).mean())
    torch.testing.assert_close(out.balance_loss.detach(), torch.stack(per_layer_b).sum())


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
    one = _model("smoe")
    one.init_expert_weights(seed=3, ep_rank=0)
    torch.manual_seed(0)
    half = LanguageModel(model_preset("tiny", vocab_size=50, moe=dict(router="smoe", num_experts=4, ep_size=2)))
    half.init_expert_weights(seed=3, ep_rank=1)  # holds global experts 2 and 3
    e_full = one.moe_layers()[1].deepspeed_moe.experts.deepspeed_experts
    e_half = half.moe_layers()[1].deepspeed_moe.experts.deepspeed_experts
    torch.testing.assert_close(e_half[0].fc1.weight, e_full[2].fc1.weight)
    torch.testing.assert_close(e_half[1].fc2.weight, e_full[3].fc2.weight)
    assert (e_full[0].fc1.weight - e_full[1].fc1.weight).abs().max() > 0


def test_generate_extends_the_prompt_reproducibly():
    model = _model().eval()
    prompt = torch.randint(0, 50, (1, 5))
    a = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, 15) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)
