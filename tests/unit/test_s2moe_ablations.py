"""Issue 28's S2MoE ablations on one process: a fixed mixing gate, the copy without the batch-mean
shift, and the lite form (no noisy dispatch; the copy exists only for InfoNCE). Each must be the
exact method it names, with the defaults' numbers where the method coincides."""

import pytest
import torch
from deepspeed.moe.layer import MoE

from s2moe_ds.config import ConfigError
from s2moe_ds.eval.flops import flops_per_token
from s2moe_ds.moe import FFN, S2MoE, S2MoEConfig, method
from s2moe_ds.train import model_preset

D, E, T = 16, 4, 64


def _layer(**kw):
    torch.manual_seed(0)
    return S2MoE(D, FFN(D, 32), **{"num_experts": E, "k": 2, **kw})


def _x(seed=1):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _train_step(layer, seed=7):
    """Output, l_aux, input gradient and parameter gradients of one training forward and backward."""
    layer.train()
    x = _x()
    torch.manual_seed(seed)
    parts = layer.forward_parts(x)
    out = parts.output
    (out.square().sum() + 0.1 * parts.losses["uncertainty"] + 0.01 * parts.losses["balance"]).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), {k: v.detach() for k, v in parts.losses.items()}, x.grad, grads, parts.metrics


def _same_except_gate(a, b):
    out_a, loss_a, xg_a, g_a, _ = a
    out_b, loss_b, xg_b, g_b, _ = b
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for name in loss_a:
        torch.testing.assert_close(loss_a[name], loss_b[name], rtol=0, atol=0)
    torch.testing.assert_close(xg_a, xg_b, rtol=0, atol=0)
    for name, g in g_b.items():
        torch.testing.assert_close(g_a[name], g, rtol=0, atol=0)
    assert set(g_a) - set(g_b) == {"mix_gate.weight", "mix_gate.bias"}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_a_gate_fixed_at_half_is_the_learned_gate_at_its_start_without_its_parameters(fused):
    # w = 0, b = 0 gives sigmoid(0) = 0.5 exactly: the same step, less the gate's own gradients.
    learned, fixed = _layer(fused=fused), _layer(fused=fused, mix_gate_fixed=0.5)
    assert fixed.mix_gate is None and not any(n.startswith("mix_gate") for n in fixed.state_dict())
    result = _train_step(fixed)
    _same_except_gate(_train_step(learned), result)
    assert torch.all(result[4]["mix_gate"] == 0.5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_a_gate_fixed_at_one_takes_only_the_clean_path_yet_dispatches_the_copies(fused):
    learned = _layer(fused=fused, mix_gate_init_bias=1000.0)  # sigmoid(1000) == 1.0 in fp32
    fixed = _layer(fused=fused, mix_gate_fixed=1.0)
    dispatched = []
    fixed.deepspeed_moe.register_forward_hook(lambda m, i, o: dispatched.append(i[0].shape[0]))
    _same_except_gate(_train_step(learned), _train_step(fixed))
    assert dispatched == [2 * T]


def test_without_the_shift_the_copy_is_centred_on_its_token():
    layer = _layer(noise_shift=False, fused=False).train()
    x = _x().detach()
    torch.manual_seed(3)
    _, x_hat = layer.noisy_pair(x)
    mu, sigma = layer.noise.statistics(x)
    torch.manual_seed(3)
    eps1, eps2 = method.draw_eps(x)
    torch.testing.assert_close(x_hat, x + sigma * (eps1 * x + eps2), rtol=0, atol=0)
    assert mu.abs().max() > 0.01  # the shift it leaves out is not zero for these tokens
    # Fused and plain agree without the shift too.
    fused_layer = _layer(noise_shift=False, fused=True).train()
    torch.manual_seed(3)
    torch.testing.assert_close(fused_layer.noisy_pair(x)[1], x_hat)


@pytest.mark.parametrize("k", [1, 2])
def test_the_lite_form_trains_exactly_as_smoe_plus_the_infonce_loss(k):
    lite = _layer(noisy_dispatch=False, k=k).train()
    smoe = MoE(D, FFN(D, 32), num_experts=E, k=k).train()
    missing, unexpected = smoe.load_state_dict(lite.state_dict(), strict=False)
    assert not missing and not unexpected  # no gate: the lite form's weights are SMoE's
    dispatched = []
    lite.deepspeed_moe.register_forward_hook(lambda m, i, o: dispatched.append(i[0].shape[0]))
    x = _x()
    torch.manual_seed(7)
    parts = lite.forward_parts(x)
    torch.manual_seed(7)
    ref_out, ref_aux, _ = smoe(x)
    torch.testing.assert_close(parts.output, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(parts.losses["balance"], ref_aux, rtol=0, atol=0)
    assert dispatched == [T] and "mix_gate" not in parts.metrics
    assert parts.losses["uncertainty"] > 0
    # L_u pulls on the layer's input: it is a loss of the tokens, not of the experts.
    grad_x, = torch.autograd.grad(parts.losses["uncertainty"], x)
    assert grad_x.abs().sum() > 0


def test_the_lite_form_with_no_infonce_is_smoe():
    lite = _layer(noisy_dispatch=False, uncertainty_coef=0.0).train()
    smoe = MoE(D, FFN(D, 32), num_experts=E, k=2).train()
    smoe.load_state_dict(lite.state_dict())
    x = _x()
    torch.manual_seed(7)
    out, l_aux, _ = lite(x)
    torch.manual_seed(7)
    ref_out, ref_aux, _ = smoe(x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(l_aux, ref_aux, rtol=0, atol=0)


def test_the_lite_forms_drop_in_l_aux_folds_infonce_as_the_full_forms_does():
    lite = _layer(noisy_dispatch=False, uncertainty_coef=0.3, balance_coef=0.01).train()
    x = _x()
    torch.manual_seed(7)
    parts = lite.forward_parts(x)
    torch.manual_seed(7)
    _, l_aux, _ = lite(x)
    torch.testing.assert_close(l_aux, parts.losses["balance"] + 30.0 * parts.losses["uncertainty"])


@pytest.mark.parametrize("kw", [dict(noisy_dispatch=False), dict(mix_gate_fixed=1.0), dict(noise_shift=False)])
def test_every_ablation_evaluates_as_plain_smoe(kw):
    layer, default = _layer(eval_k=1, **kw).eval(), _layer(eval_k=1).eval()
    default.load_state_dict(layer.state_dict(), strict=False)
    x = _x().detach()
    torch.testing.assert_close(layer(x)[0], default(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kw,field", [
    (dict(mix_gate_fixed=1.5), "s2moe.mix_gate_fixed"),
    (dict(mix_gate_fixed=float("nan")), "s2moe.mix_gate_fixed"),
    (dict(noisy_dispatch=False, mix_gate_fixed=0.5), "s2moe.mix_gate_fixed"),
    (dict(noisy_dispatch=False, uncertainty_on="output"), "s2moe.uncertainty_on"),
    (dict(noisy_dispatch=False, eval_noise="mean"), "s2moe.eval_noise"),
    (dict(noise_shift="no"), "s2moe.noise_shift"),
])
def test_bad_ablation_settings_are_refused_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        S2MoEConfig(**kw)


def test_the_lite_form_costs_smoes_training_flops_and_a_fixed_gate_has_no_gate_flops():
    def flops(block="s2moe", **settings):
        cfg = model_preset("tiny", moe=dict(block=block, k=2, **({"block_config": settings} if settings else {})))
        return flops_per_token(cfg, seq_len=64, training=True)["total"]

    full, lite, fixed, smoe = flops(), flops(noisy_dispatch=False), flops(mix_gate_fixed=1.0), flops("moe")
    assert lite == smoe
    assert full > fixed > lite
