"""Typed routes: a router's route() is a function of its inputs that leaves nothing behind in the
router, and a block's losses and metrics are its route's."""

import pytest
import torch

from s2moe_ds.moe import FFN, MoEConfig, build_block
from s2moe_ds.moe.routers.route import Route
from s2moe_ds.moe.spec import ModelContext
from s2moe_ds.parallel import deepspeed_internals as ds

D, E, V, T = 8, 4, 11, 24

ROUTERS = {
    "topk": {},
    "topk-jitter": dict(noisy_gate_policy="Jitter"),
    "xmoe": {},
    "stablemoe": dict(stablemoe_stage1_steps=2),
    "stablemoe-frozen": dict(stablemoe_stage1_steps=2),
    "smoe_dropout": dict(smoe_dropout_steps=4),
    "lossfree": {},
}


def _router(name, k=2):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, k=k, block="moe", router=name.split("-")[0], router_config=ROUTERS[name])
    router = build_block(cfg, "moe", D, FFN(D, 16), 1, ModelContext(vocab_size=V)).router
    if name == "stablemoe-frozen":
        router.freeze()
    return router


def _state(router):
    """Everything a call could leave behind: attributes (by identity), buffers and parameters (by value)."""
    attrs = {k: v for k, v in vars(router).items() if k not in ("_parameters", "_buffers", "_modules")}
    return attrs, {n: t.clone() for n, t in router.state_dict(keep_vars=False).items()}


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    mask_T = torch.ones(T)
    mask_T[-3:] = 0
    return torch.randn(T, D, generator=g), torch.randint(0, V, (T,), generator=g), mask_T


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(ROUTERS))
def test_route_leaves_nothing_behind_in_the_router(name, training):
    router = _router(name).train(training)
    before_attrs, before_tensors = _state(router)
    x_TD, ids_T, mask_T = _inputs(1)
    route = router.route(x_TD, ids_T, mask_T)
    assert isinstance(route, Route)
    after_attrs, after_tensors = _state(router)
    assert after_attrs.keys() == before_attrs.keys()
    assert all(after_attrs[k] is before_attrs[k] for k in before_attrs), name
    for n, t in before_tensors.items():
        torch.testing.assert_close(after_tensors[n], t, rtol=0, atol=0, msg=n)
    # The route says everything the block reads: losses in the graph, metrics detached.
    assert route.expert_ids_TK.shape == route.combine_weights_TK.shape == (T, 2)
    assert route.scores_TE.shape == (T, E) and route.scores_TE.dtype == torch.float32
    assert route.losses["balance"].dim() == 0 and set(route.metrics) == {"expert_counts", "dropped_fraction"}
    assert not any(m.requires_grad for m in route.metrics.values())


def test_interleaved_routes_with_other_token_ids_equal_separate_ones():
    """StableMoE's stage 2 routes by token id: a call with other ids in between (as analysis makes
    inside a dispatch) changes nothing, because the ids travel with the call."""
    router = _router("stablemoe-frozen").eval()
    x_TD, ids_a, _ = _inputs(1)
    _, ids_b, _ = _inputs(2)
    alone_a = router.route(x_TD, ids_a).expert_ids_TK.clone()
    alone_b = router.route(x_TD, ids_b).expert_ids_TK.clone()
    assert not torch.equal(alone_a, alone_b)  # the ids decide, so a leak would show
    first = router.route(x_TD, ids_a)
    probs_b = router.probabilities(x_TD, ids_b)
    second = router.route(x_TD, ids_b)
    assert torch.equal(first.expert_ids_TK, alone_a) and torch.equal(second.expert_ids_TK, alone_b)
    torch.testing.assert_close(probs_b, torch.softmax(second.scores_TE, -1))


@pytest.mark.parametrize("block", ["moe", "s2moe"])
def test_a_blocks_losses_and_metrics_are_its_routes(block):
    """The block's balance loss, the router's own losses and the metrics come from the route of
    its call: the same numbers as routing the same tokens directly, with no attribute read later."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, k=2, block=block, router="stablemoe", router_config=ROUTERS["stablemoe"])
    layer = build_block(cfg, block, D, FFN(D, 16), 1, ModelContext(vocab_size=V)).eval()
    x_TD, ids_T, _ = _inputs(3)
    parts = layer.forward_parts(x_TD, token_ids=ids_T)
    route = layer.router.route(x_TD, ids_T)
    torch.testing.assert_close(parts.losses["balance"], route.losses["balance"], rtol=0, atol=0)
    assert torch.equal(parts.metrics["expert_counts"], route.metrics["expert_counts"])
    layer.train()
    torch.manual_seed(5)
    parts = layer.forward_parts(x_TD, token_ids=ids_T)
    assert "distill" in parts.losses and parts.losses["distill"].requires_grad


def test_deepspeeds_gating_reaches_routers_by_name_only():
    """The adapter names the parts of DeepSpeed's gating tuple; no tuple leaves it."""
    logits_TE = torch.randn(T, E)
    gating = ds.gate_on_logits(logits_TE, k=2, capacity_factor=1.0, min_capacity=4, used_token=None,
                               noisy_gate_policy=None, drop_tokens=True, use_rts=False, ep_group=None,
                               second_expert_sampling=False)
    assert set(gating) == {"expert_ids_TK", "positions_TK", "combine_weights_TK", "capacity", "balance",
                           "expert_counts"}
    assert gating["expert_ids_TK"].shape == (T, 2)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_deepspeeds_dense_gate_form_comes_from_the_same_route(k):
    """DeepSpeed's MoE code may call a gate for its dense form (sparse_routes False): the router
    gives it from its route, as DeepSpeed's TopKGate with the same weight does."""
    router = _router("topk", k=k).eval()
    # DeepSpeed's gate keeps its randomness in eval; ours has none there.
    gate = ds.TopKGate(D, E, k=k, min_capacity=4, use_rts=False, top2_2nd_expert_sampling=False).eval()
    gate.load_state_dict(router.state_dict())
    router.eval_drop_tokens = True  # DeepSpeed's gate drops in eval
    x_TD, _, _ = _inputs(4)
    ours, theirs = router(x_TD), gate(x_TD)
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
