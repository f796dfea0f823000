"""Expert parallelism on 2 gloo ranks: ep_size 2 equals ep_size 1 with the same global weights,
and both paths share one all-to-all pair."""

import pytest
import torch

from s2moe_ds.moe import FFN, S2MoE
from s2moe_ds.parallel import ExpertLayout

from ..harness import counting_all_to_all, run_distributed

D, E, T = 8, 4, 24


def _make(ep_size, **kw):
    return S2MoE(D, FFN(D, 16), num_experts=E, ep_size=ep_size, k=2, **kw)


def _load_global_weights(layer, global_state, layout):
    layer.load_state_dict({n: global_state[layout.global_param_name(n)] for n in layer.state_dict()})


def _run(layer, x, seed, train):
    layer.train(train)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out, l_aux, _ = layer(x)
    (out.square().sum() + l_aux).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), l_aux.detach(), x.grad, grads


def _parity_worker(rank, world_size, train, kw, impl="loop"):
    import deepspeed.comm as dist
    torch.manual_seed(0)  # identical global weights on every rank
    ref = _make(1, **kw)
    ep = _make(world_size, **kw)
    ep.use_expert_impl(impl)  # the reference keeps DeepSpeed's loop
    # This rank's experts, read from DeepSpeed's expert-parallel groups (the same ones the layer joins).
    layout = ExpertLayout.from_process_groups(E, world_size)
    assert layout.global_ids() == [2 * rank, 2 * rank + 1]
    _load_global_weights(ep, ref.state_dict(), layout)
    for layer in (ref, ep):
        layer.set_deepspeed_parallelism()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(100 + rank))  # this rank's tokens
    r_out, r_aux, r_xgrad, r_grads = _run(ref, x, seed=7 + rank, train=train)
    e_out, e_aux, e_xgrad, e_grads = _run(ep, x, seed=7 + rank, train=train)
    torch.testing.assert_close(e_out, r_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e_aux, r_aux)
    torch.testing.assert_close(e_xgrad, r_xgrad, rtol=1e-5, atol=1e-6)
    # With ep_size 1 each rank's expert gradient covers its own tokens; summed over ranks it is
    # the gradient an expert-parallel expert gets from both ranks' tokens through the all-to-all.
    for name in r_grads:
        if "experts" in name:
            dist.all_reduce(r_grads[name])
    for name, g in e_grads.items():
        torch.testing.assert_close(g, r_grads[layout.global_param_name(name)], rtol=1e-5, atol=1e-5)
    # Every parameter learns in training; in eval the mixing gate is unused (x_hat = x).
    expected = {n for n, _ in ep.named_parameters() if train or not n.startswith("mix_gate")}
    assert set(e_grads) == expected
    return e_out.abs().sum().item()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kw,impl", [({}, "loop"), (dict(noise_stats="global", eval_k=1), "loop"), ({}, "batched"),
                                     (dict(noisy_dispatch=False), "loop"),
                                     (dict(mix_gate_fixed=0.5, noise_shift=False), "loop")],
                         ids=["default", "global-stats", "batched-experts", "lite", "fixed-gate-no-shift"])
def test_ep2_matches_ep1_outputs_and_gradients(train, kw, impl):
    sums = run_distributed(_parity_worker, world_size=2, args=(train, kw, impl))
    assert sums[0] != sums[1]  # the ranks really saw different tokens


def _a2a_worker(rank, world_size):
    from deepspeed.moe.layer import MoE
    with counting_all_to_all() as calls:
        counts = {}
        torch.manual_seed(0)
        for name, layer in (("s2moe", _make(world_size)),
                            ("smoe", MoE(D, FFN(D, 16), num_experts=E, ep_size=world_size, k=2))):
            layer.set_deepspeed_parallelism()
            for mode in ("train", "eval"):
                layer.train(mode == "train")
                x = torch.randn(T, D, requires_grad=True)
                calls["n"] = 0
                out, l_aux, _ = layer(x)
                forward = calls["n"]
                (out.sum() + l_aux).backward()
                counts[f"{name}/{mode}"] = (forward, calls["n"] - forward)
        return counts


def test_one_all_to_all_pair_per_layer_for_both_paths():
    counts = run_distributed(_a2a_worker, world_size=2)[0]
    assert counts["s2moe/train"] == (2, 2), counts  # dispatch + combine, forward and backward
    assert counts["s2moe/eval"] == (2, 2), counts
    assert counts["s2moe/train"] == counts["smoe/train"]  # the dual path adds no collective
