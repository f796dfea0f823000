"""The S2MoE layer on one process: eval semantics, the mixing gate, the losses, the block registry."""

import pytest
import torch
from deepspeed.moe.layer import MoE

from s2moe_ds.moe import FFN, MoEBlock, MoEConfig, S2MoE, S2MoEConfig, TopKRouter, build_block

D = 16


def _layer(**kw):
    torch.manual_seed(0)
    args = dict(num_experts=4, k=2)
    args.update(kw)
    return S2MoE(D, FFN(D, 32), **args)


def _x(T=64, seed=1):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def _count_dispatches(layer):
    calls = []
    layer.deepspeed_moe.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls


@pytest.mark.parametrize("eval_k", [1, 2])
def test_eval_is_plain_smoe_with_eval_k_experts_in_one_dispatch(eval_k):
    layer = _layer(eval_k=eval_k).eval()
    plain = MoE(D, FFN(D, 32), num_experts=4, k=eval_k, use_rts=False, top2_2nd_expert_sampling=False).eval()
    missing, unexpected = plain.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"mix_gate.weight", "mix_gate.bias"}
    calls = _count_dispatches(layer)
    x = _x()
    out, l_aux, counts = layer(x)
    ref_out, ref_aux, ref_counts = plain(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(l_aux, ref_aux)
    assert calls == [64] and int(counts.sum()) == 64 * eval_k


@pytest.mark.parametrize("kw", [dict(k=2, eval_k=2), dict(k=2, eval_k=1, eval_capacity_factor=0.25)])
def test_eval_is_deterministic_despite_deepspeed_router_randomness(kw):
    # k=2 keeps DeepSpeed's second-expert Gumbel sampling on; top-1 with a small capacity would
    # use random token selection: both are off in eval mode only.
    layer = _layer(noisy_gate_policy="Jitter", **kw).eval()
    x = _x()
    first = layer(x)[0]
    for seed in range(3):
        torch.manual_seed(seed)
        torch.testing.assert_close(layer(x)[0], first, rtol=0, atol=0)
    assert layer.training is False and layer.deepspeed_moe.gate.k == 2  # training k restored
    assert layer.forward_parts(x).metrics["dropped_fraction"] > 0 if "eval_capacity_factor" in kw else True


def test_training_routes_both_paths_in_one_dispatch_and_mixes_them():
    layer = _layer().train()
    calls = _count_dispatches(layer)
    x = _x()
    torch.manual_seed(0)
    parts = layer.forward_parts(x)
    assert calls == [128]  # clean and noisy tokens together, once
    assert int(parts.metrics["expert_counts"].sum()) == 2 * 64 * 2
    # Recompute by hand from the same random draws: out = g*SMoE(x) + (1-g)*SMoE(x_hat).
    torch.manual_seed(0)
    x_hat = layer.noise(x)
    y = layer.deepspeed_moe(torch.cat([x, x_hat]), None)
    g = torch.sigmoid(layer.mix_gate(x))
    torch.testing.assert_close(parts.output, g * y[:64] + (1 - g) * y[64:])


def test_mixing_gate_starts_at_its_init_bias_and_everything_gets_gradients():
    layer = _layer(noise_scale=1.0).train()
    x = _x().requires_grad_()
    out, l_aux, counts = layer(x)
    torch.manual_seed(0)
    assert layer.forward_parts(x).metrics["mix_gate"].mean() == pytest.approx(0.5, abs=1e-6)
    (out.square().mean() + 0.01 * l_aux).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    biased = _layer(mix_gate_init_bias=2.0).train()
    assert biased.forward_parts(x).metrics["mix_gate"].mean() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())


def test_drop_in_l_aux_carries_the_uncertainty_loss_weighted_by_its_coefficient():
    layer = _layer(uncertainty_coef=0.3, balance_coef=0.02).train()
    x = _x()
    torch.manual_seed(4)
    out, l_aux, _ = layer(x)
    torch.manual_seed(4)
    parts = layer.forward_parts(x)
    assert parts.losses["uncertainty"] > 0
    torch.testing.assert_close(0.02 * l_aux, 0.02 * parts.losses["balance"] + 0.3 * parts.losses["uncertainty"])
    # Eval: no noise, no uncertainty term.
    layer.eval()
    _, l_aux_eval, _ = layer(x)
    parts_eval = layer.forward_parts(x)
    torch.testing.assert_close(l_aux_eval, parts_eval.losses["balance"])
    assert parts_eval.losses["uncertainty"] == 0


def test_uncertainty_on_output_trains_the_experts_and_on_input_does_not():
    for where, experts_get_grad in (("input", False), ("output", True)):
        layer = _layer(uncertainty_on=where).train()
        x = _x().requires_grad_()
        layer.forward_parts(x).losses["uncertainty"].backward()
        expert_grad = sum(
            p.grad.abs().sum() for n, p in layer.named_parameters() if "experts" in n and p.grad is not None)
        assert (float(expert_grad) > 0) == experts_get_grad, where
        assert x.grad.abs().sum() > 0


def test_eval_noise_options():
    x = _x()
    mean = _layer(eval_noise="mean").eval()
    calls = _count_dispatches(mean)
    torch.testing.assert_close(mean(x)[0], mean(x)[0], rtol=0, atol=0)
    assert calls == [128, 128]
    none = _layer(eval_noise="none").eval()
    assert (none(x)[0] - mean(x)[0]).abs().max() > 1e-4
    sample = _layer(eval_noise="sample").eval()
    assert (sample(x)[0] - sample(x)[0]).abs().max() > 1e-4


def test_one_expert_s2moe_in_eval_equals_a_dense_ffn():
    layer = _layer(num_experts=1, k=1).eval()
    dense = FFN(D, 32)
    dense.load_state_dict(layer.deepspeed_moe.experts.deepspeed_experts[0].state_dict())
    x = _x(50)
    torch.testing.assert_close(layer(x)[0], dense(x))
    torch.testing.assert_close(build_block(MoEConfig(block="dense"), "dense", D, dense).forward_parts(x).output, dense(x))


def test_bf16_layer_keeps_router_and_gate_math_in_fp32():
    layer = _layer().to(torch.bfloat16).train()
    x = _x().to(torch.bfloat16).requires_grad_()
    parts = layer.forward_parts(x)
    assert parts.output.dtype == torch.bfloat16
    assert parts.losses["uncertainty"].dtype == torch.float32 and parts.metrics["mix_gate"].dtype == torch.float32
    (parts.output.float().sum() + parts.losses["uncertainty"]).backward()
    assert layer.mix_gate.weight.grad.abs().sum() > 0


def test_registry_builds_each_block_kind_behind_one_interface():
    x = _x(32).reshape(2, 16, D)
    blocks = {kind: build_block(MoEConfig(block=kind, num_experts=4, eval_k=1), kind, D, FFN(D, 32))
              for kind in ("s2moe", "moe", "dense")}
    assert type(blocks["s2moe"]) is S2MoE and blocks["s2moe"].eval_k == 1
    assert type(blocks["moe"]) is MoEBlock and isinstance(blocks["moe"], MoE)  # DeepSpeed's own layer
    assert isinstance(blocks["moe"].deepspeed_moe.gate, TopKRouter)
    assert type(blocks["dense"]) is FFN
    for name, block in blocks.items():
        for mode in (True, False):
            block.train(mode)
            parts = block.forward_parts(x)
            assert parts.output.shape == x.shape, name
            assert all(loss.dim() == 0 for loss in parts.losses.values()), name
            assert set(parts.losses) == set(MoEConfig(block=name).loss_terms()), name
            if name != "dense":  # DeepSpeed MoE's drop-in interface
                out, l_aux, counts = block(x)
                assert out.shape == x.shape and l_aux.dim() == 0, name
    s2 = build_block(MoEConfig(block_config=S2MoEConfig(noise_scale=0.25, uncertainty_tokens=64)), "s2moe", D,
                     FFN(D, 32))
    assert s2.noise.noise_scale == 0.25 and s2.config.uncertainty_tokens == 64
    # The S2MoE mixing gate never lands in DeepSpeed's per-expert checkpoint files.
    assert not [n for n in s2.state_dict() if "expert" in n and "mix_gate" in n]


def test_eval_without_drops_is_independent_of_the_rest_of_the_batch():
    x = _x(96)
    kept = _layer(eval_k=1, eval_capacity_factor=0.5, eval_drop_tokens=False).eval()
    torch.testing.assert_close(kept(x)[0][:32], kept(x[:32])[0])
    assert float(kept.forward_parts(x).metrics["dropped_fraction"]) == 0.0
    dropping = _layer(eval_k=1, eval_capacity_factor=0.5).eval()  # DeepSpeed's default: drops in eval
    assert float(dropping.forward_parts(x).metrics["dropped_fraction"]) > 0
    assert build_block(MoEConfig(), "s2moe", D, FFN(D, 32)).deepspeed_moe.gate.eval_drop_tokens is False


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bf16_top1_with_a_padding_mask_routes_hundreds_of_tokens_per_expert_exactly(train):
    """DeepSpeed's top-1 gate counts capacity slots in the mask's dtype: a bf16 mask holds whole
    numbers exactly only up to 256, so tokens past that would share slots. An all-ones mask must
    route exactly as no mask."""
    layer = _layer(num_experts=2, k=1, drop_tokens=False, noise_scale=0.0).to(torch.bfloat16).train(train)
    x = _x(T=1200).to(torch.bfloat16)
    outs = []
    for mask in (None, torch.ones(1200, dtype=torch.bfloat16)):
        torch.manual_seed(3)
        outs.append(layer.forward_parts(x, mask).output)
    assert (layer.deepspeed_moe.exp_counts > 300).all()  # well past bf16's exact integers
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
