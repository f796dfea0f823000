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
            m.moe.router_config.balance_loss, m.moe.block_config.uncertainty_negatives) == \
        ("relu", False, False, False, "all_assignments", "global")
    assert apply_protocol(PRESETS["tiny"](), "deepspeed").model == PRESETS["tiny"]().model
    from s2moe_ds.cli import experiment_from_args, pretrain_parser
    parser = pretrain_parser()
    ns = parser.parse_args(["--protocol", "sister", "--activation", "gelu", "--deepspeed_config", "x"])
    assert experiment_from_args(ns).model.activation == "gelu"
    ns = parser.parse_args(["--protocol", "sister", "--router", "xmoe", "--deepspeed_config", "x"])
    assert experiment_from_args(ns).model.moe.router == "xmoe"  # the top-k part stays with the top-k router
    with pytest.raises(ConfigError, match="protocol: must be one of 'deepspeed', 'sister'"):
        apply_protocol(PRESETS["tiny"](), "fastmoe")


def _reference_global(anchors, positives, tau):
    """Every anchor of every rank against every positive, one process, no chunks."""
    a, p = torch.cat(anchors), torch.cat(positives)
    logits = F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).t() / tau
    return F.cross_entropy(logits, torch.arange(a.shape[0]), reduction="none")


def _gathered_worker(rank, world_size):
    from s2moe_ds.moe import S2MoE
    from s2moe_ds.moe.method import gathered_info_nce
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(9, D, generator=g), torch.randn(9, D, generator=g)) for _ in range(world_size)]
    masks = [torch.tensor([1] * 9), torch.tensor([1] * 6 + [0] * 3)]  # 9 and 6 tokens: padding in the gather
    a, p = (t.clone().requires_grad_() for t in data[rank])
    loss = gathered_info_nce(a, p, 0.1, chunk=4, mask_T=masks[rank])
    loss.backward()
    # The S2MoE layer with global negatives trains on 2 ranks.
    torch.manual_seed(0)
    layer = S2MoE(D, FFN(D, 16), num_experts=E, ep_size=world_size, k=2, uncertainty_negatives="global").train()
    layer.set_deepspeed_parallelism()
    parts = layer.forward_parts(torch.randn(1, 12, D, generator=torch.Generator().manual_seed(rank)))
    (parts.output.square().mean() + parts.losses["uncertainty"]).backward()
    return loss.detach(), a.grad, p.grad, parts.losses["uncertainty"].detach()


def test_global_negatives_equal_one_process_over_the_whole_batch_with_gradients():
    from ..harness import run_distributed
    results = run_distributed(_gathered_worker, world_size=2)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(9, D, generator=g), torch.randn(9, D, generator=g)) for _ in range(2)]
    kept = [9, 6]
    anchors = [data[r][0][:kept[r]].clone().requires_grad_() for r in range(2)]
    positives = [data[r][1][:kept[r]].clone().requires_grad_() for r in range(2)]
    per_anchor = _reference_global(anchors, positives, 0.1)
    losses = [per_anchor[:9].mean(), per_anchor[9:].mean()]
    (losses[0] + losses[1]).backward()  # each rank's loss, summed: what data parallelism averages
    for r in range(2):
        loss, a_grad, p_grad, layer_loss = results[r]
        torch.testing.assert_close(loss, losses[r].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a_grad[:kept[r]], anchors[r].grad, rtol=1e-4, atol=1e-6)
        # A positive's gradient comes from both ranks' anchors, through the gather's backward.
        torch.testing.assert_close(p_grad[:kept[r]], positives[r].grad, rtol=1e-4, atol=1e-6)
        assert a_grad[kept[r]:].abs().sum() == 0
        assert layer_loss > 0
