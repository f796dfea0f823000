"""The loss-free balancing router (moe/routers/lossfree.py): the bias picks the experts but never
weighs them, there is no balance loss, the bias moves towards balance from the loads, the trainer's
hook sums the loads over micro-batches, and bad settings are refused naming the field."""

import re

import pytest
import torch

from s2moe_ds.cli import experiment_from_args, pretrain_parser
from s2moe_ds.config import ConfigError
from s2moe_ds.models.base import LMOutput
from s2moe_ds.moe import FFN, MoEConfig, build_block
from s2moe_ds.moe.spec import ModelContext
from s2moe_ds.train.hooks import LoadBalancingBias

D, E, V, T = 8, 4, 11, 24


def _layer(block="moe", k=2, **router_config):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, k=k, block=block, router="lossfree", router_config=router_config)
    return build_block(cfg, block, D, FFN(D, 16), 1, ModelContext(vocab_size=V))


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("normalize", [True, False])
def test_the_bias_selects_the_experts_and_the_scores_alone_weigh_them(score, normalize):
    router = _layer(lossfree_score=score, lossfree_normalize=normalize).router.train()
    x_TD = torch.randn(T, D)
    router.selection_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 5.0]))  # far above any score
    route = router.route(x_TD)
    chosen_TK = route.expert_ids_TK.long()
    kept_TK = route.kept_TK
    assert set(chosen_TK[kept_TK].tolist()) == {2, 3}  # every token picks the biased experts ...
    z_TE = x_TD @ router.linear.weight.t()
    s_TE = torch.sigmoid(z_TE) if score == "sigmoid" else torch.softmax(z_TE, dim=-1)
    expected_TK = s_TE.gather(1, chosen_TK.clamp_min(0)) * kept_TK  # ... weighed by s, never s + b
    if normalize:
        expected_TK = expected_TK / expected_TK.sum(1, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(route.combine_weights_TK, expected_TK)
    torch.testing.assert_close(route.scores_TE, z_TE)  # the router's logits, as z-loss reads them
    assert route.losses["balance"].item() == 0.0


def test_no_balance_loss_and_the_router_learns_from_the_task_alone():
    layer = _layer().train()
    parts = layer.forward_parts(torch.randn(T, D))
    assert parts.losses["balance"].item() == 0.0 and not parts.losses["balance"].requires_grad
    parts.output.square().sum().backward()
    assert layer.router.linear.weight.grad.abs().sum() > 0
    assert layer.router.selection_bias.grad is None  # a buffer: never an optimizer's


def test_update_bias_lowers_the_overloaded_raises_the_underloaded_by_u():
    router = _layer(lossfree_bias_rate=0.01).router
    router.update_bias(torch.tensor([30, 10, 20, 20]))  # mean 20
    assert router.selection_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    assert router.selection_bias.dtype == torch.float32
    router.update_bias(torch.tensor([30, 10, 20, 20]))
    assert router.selection_bias.tolist() == pytest.approx([-0.02, 0.02, 0.0, 0.0])


@pytest.mark.parametrize("block", ["moe", "s2moe"])
def test_repeated_updates_from_the_loads_balance_a_skewed_router(block):
    layer = _layer(block, lossfree_bias_rate=0.01).train()
    with torch.no_grad():
        layer.router.linear.weight[0] += 0.5  # every token prefers expert 0
    x_TD = torch.randn(64, D) + 1.0

    def loads():
        return layer.forward_parts(x_TD).metrics["expert_counts"]

    first = loads()
    for _ in range(100):
        layer.router.update_bias(loads())
    last = loads()
    routes = 64 * 2 * (2 if block == "s2moe" else 1)  # under S2MoE the loads count both paths
    assert first.sum() == last.sum() == routes
    assert first.max() > 0.4 * routes and last.max() < 0.3 * routes, (first, last)
    assert layer.router.selection_bias[0] == layer.router.selection_bias.min() < 0


def test_the_hook_sums_every_micro_batch_then_updates_each_layer():
    routers = [_layer(lossfree_bias_rate=0.1).router for _ in range(2)]
    hook = LoadBalancingBias(routers)

    def out(*counts):
        return LMOutput(None, None, layer_metrics={f"layer{i}/expert_counts": torch.tensor(c)
                                                   for i, c in enumerate(counts)})

    hook.after_forward(None, 1, out([4, 0, 2, 2], [1, 1, 1, 1]))
    hook.after_forward(None, 1, out([0, 4, 2, 2], [3, 1, 1, 3]))  # layer 0 balanced over the step
    hook.on_step_end(None, 1)
    assert routers[0].selection_bias.tolist() == [0.0] * 4
    assert routers[1].selection_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, -0.1])
    with pytest.raises(RuntimeError, match="expert counts for 1 of the model's 2 MoE layers"):
        hook.after_forward(None, 2, out([1, 1, 1, 1]))


def test_eval_forwards_leave_the_bias_alone_and_the_checkpoint_carries_it():
    layer = _layer()
    layer.router.update_bias(torch.tensor([9, 1, 5, 5]))
    before = layer.router.selection_bias.clone()
    layer.eval()
    with torch.no_grad():
        layer.forward_parts(torch.randn(T, D))
    assert torch.equal(layer.router.selection_bias, before)
    state = layer.state_dict()
    key = next(k for k in state if k.endswith("selection_bias"))
    assert "expert" not in key  # DeepSpeed's non-expert file, resharded as any non-expert weight
    fresh = _layer()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.router.selection_bias, before)


def test_the_initial_router_is_smoes():
    torch.manual_seed(0)
    smoe = build_block(MoEConfig(num_experts=E, k=2, block="moe"), "moe", D, FFN(D, 16), 1)
    assert torch.equal(_layer().router.linear.weight, smoe.router.linear.weight)


@pytest.mark.parametrize("settings, message", [
    (dict(lossfree_bias_rate=-0.001), "lossfree.lossfree_bias_rate: must be a finite number >= 0.0, got -0.001"),
    (dict(lossfree_bias_rate=float("nan")), "lossfree.lossfree_bias_rate: must be a finite number"),
    (dict(lossfree_bias_rate="fast"), "lossfree.lossfree_bias_rate: must be a finite number"),
    (dict(lossfree_score="relu"), "lossfree.lossfree_score: must be one of 'sigmoid', 'softmax', got 'relu'"),
    (dict(lossfree_normalize="yes"), "lossfree.lossfree_normalize: must be true or false, got 'yes'"),
])
def test_bad_settings_are_refused_naming_the_field(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        MoEConfig(router="lossfree", router_config=settings)


def test_one_expert_per_token_with_normalized_weights_is_refused():
    with pytest.raises(ConfigError, match="lossfree.lossfree_normalize: with moe.k 1 .* --lossfree.no-normalize"):
        MoEConfig(router="lossfree", k=1)
    MoEConfig(router="lossfree", k=1, router_config=dict(lossfree_normalize=False))
    MoEConfig(router="lossfree", k=2, eval_k=1)  # evaluation with one expert is fine


def test_flags():
    args = pretrain_parser().parse_args(["--moe.block", "s2moe", "--moe.router", "lossfree", "--lossfree.bias-rate",
                                         "0.01", "--lossfree.score", "softmax", "--lossfree.no-normalize"])
    moe = experiment_from_args(args).model.moe
    assert (moe.block, moe.router) == ("s2moe", "lossfree")
    cfg = moe.router_config
    assert (cfg.lossfree_bias_rate, cfg.lossfree_score, cfg.lossfree_normalize) == (0.01, "softmax", False)
