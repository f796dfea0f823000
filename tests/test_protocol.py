"""The authors' sister-code training protocol (`--protocol sister`) and each of its parts as an
option of its own: ReLU experts, no token drops, deterministic top-k, the balance loss over every
top-k assignment."""

import pytest
import torch
import torch.nn.functional as F

from s2moe_ds.config import ConfigError
from s2moe_ds.models import ModelConfig, build_model
from s2moe_ds.moe import FFN, MoEConfig, build_block
from s2moe_ds.moe.routers.base import assignment_balance, gshard_balance
from s2moe_ds.train import PRESETS
from s2moe_ds.train.presets import apply_protocol

D, E, T = 8, 4, 64


def _block(**router_config):
    cfg = MoEConfig(num_experts=E, k=2, block="moe", drop_tokens=False, router_config=router_config)
    return build_block(cfg, "moe", D, FFN(D, 16), 1)


def test_the_assignment_balance_loss_is_one_over_k_at_balance_and_pushes_overloaded_experts_down():
    even_TE = torch.zeros(T, E)
    for t in range(T):
        even_TE[t, t % E] = 1.0
        even_TE[t, (t + 1) % E] = 0.5  # every expert is first for T/E tokens and second for T/E
    probs = F.softmax(even_TE, dim=-1)
    assert assignment_balance(probs, even_TE, 2).item() == pytest.approx(0.5)
    assert gshard_balance(probs, even_TE, 2).item() == pytest.approx(1.0)
    skewed_TE = torch.zeros(T, E)
    skewed_TE[:, 0] = 2.0
    skewed_TE[:, 1] = 1.0  # experts 0 and 1 take every assignment
    skewed_TE.requires_grad_()
    loss = assignment_balance(F.softmax(skewed_TE, dim=-1), skewed_TE, 2)
    assert loss.item() > 0.5
    loss.backward()
    assert skewed_TE.grad[:, 0].min() > 0 and skewed_TE.grad[:, 2:].max() < 0


def test_the_topk_router_reports_the_balance_loss_its_setting_names():
    torch.manual_seed(0)
    x = torch.randn(T, D)
    for form, reference in (("all_assignments", assignment_balance), ("deepspeed", gshard_balance)):
        block = _block(balance_loss=form, top2_2nd_expert_sampling=False).train()
        out = block.forward_parts(x[None])
        logits = block.router.route_logits(x)
        assert out.losses["balance"].item() == pytest.approx(reference(F.softmax(logits, -1), logits, 2).item(),
                                                             rel=1e-5)


def test_deterministic_top_k_routes_the_same_tokens_the_same_way_in_training():
    torch.manual_seed(0)
    x = torch.randn(1, T, D)

    def twice(**settings):
        block = _block(**settings).train()
        outs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            outs.append(block.forward_parts(x).output)
        return outs
    a, b = twice(top2_2nd_expert_sampling=False, use_rts=False)
    assert torch.equal(a, b)
    a, b = twice()  # DeepSpeed's default samples the second expert
    assert not torch.equal(a, b)


def test_relu_experts():
    ffn = FFN(D, 16, activation="relu")
    x = torch.randn(5, D)
    torch.testing.assert_close(ffn(x), ffn.fc2(torch.relu(ffn.fc1(x))))
    model = build_model(ModelConfig(vocab_size=11, d_model=D, n_head=2, d_inner=16, activation="relu",
                                    moe=MoEConfig(num_experts=E)))
    experts = [m for m in model.modules() if isinstance(m, FFN)]
    assert experts and all(m.activation is F.relu for m in experts)
    with pytest.raises(ConfigError, match="model.activation: must be one of 'gelu', 'relu'"):
        ModelConfig(activation="swish")


def test_the_sister_protocol_sets_each_part_and_later_flags_still_win():
    exp = apply_protocol(PRESETS["txl-tiny"](), "sister")
    m = exp.model
    assert (m.activation, m.moe.drop_tokens, m.moe.router_config.use_rts, m.moe.router_config.top2_2nd_expert_sampling,
            m.moe.router_config.balance_loss) == ("relu", False, False, False, "all_assignments")
    assert apply_protocol(PRESETS["tiny"](), "deepspeed").model == PRESETS["tiny"]().model
    from s2moe_ds.cli import experiment_from_args, pretrain_parser
    parser = pretrain_parser()
    ns = parser.parse_args(["--protocol", "sister", "--activation", "gelu", "--deepspeed_config", "x"])
    assert experiment_from_args(ns).model.activation == "gelu"
    ns = parser.parse_args(["--protocol", "sister", "--router", "xmoe", "--deepspeed_config", "x"])
    assert experiment_from_args(ns).model.moe.router == "xmoe"  # the top-k part stays with the top-k router
    with pytest.raises(ConfigError, match="protocol: must be one of 'deepspeed', 'sister'"):
        apply_protocol(PRESETS["tiny"](), "fastmoe")
