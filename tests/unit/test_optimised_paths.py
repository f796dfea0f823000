"""Each function of moe/fused against the plain formula of moe/method it replaces: same outputs,
same gradients (docs/performance.md has what each saves); and the layer with S2MoEConfig.fused on
and off."""

import pytest
import torch

from s2moe_ds.moe import FFN, S2MoE, fused, method

D = 16
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def _tensors(T=48, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, D, generator=g) * 2 + 1).to(dtype)
    mu = torch.randn(D, generator=g)
    scale = torch.rand(D, generator=g)
    eps1, eps2 = torch.randn(2, T, D, generator=g).unbind(0)
    grad = torch.randn(2 * T, D, generator=g).to(dtype)
    return x, mu, scale, eps1, eps2, grad


def _value_and_grad(fn, x, *args, grad, grad_hat=None):
    """fn returns ([x; x_hat], x_hat); backward of grad on the first, grad_hat (or nothing) on x_hat."""
    x = x.clone().requires_grad_()
    both, x_hat = fn(x, *args)
    outs, grads = [both], [grad]
    if grad_hat is not None:
        outs.append(x_hat)
        grads.append(grad_hat)
    torch.autograd.backward(outs, grads)
    return both.detach(), x_hat.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hat_grad", [False, True], ids=["concat-only", "with-x_hat-grad"])
def test_fused_noisy_concat_matches_the_plain_formula(dtype, hat_grad):
    x, mu, scale, eps1, eps2, grad = _tensors(dtype=dtype)
    grad_hat = grad[: x.shape[0]] * 3 if hat_grad else None  # as the InfoNCE loss sends into x_hat
    plain = _value_and_grad(method.noisy_concat, x, mu, scale, eps1, eps2, grad=grad, grad_hat=grad_hat)
    # The fused path consumes the draw (its buffers become the slope and x_hat), the plain one not.
    _, _, _, eps1_again, eps2_again, _ = _tensors(dtype=dtype)
    assert torch.equal(eps1, eps1_again) and torch.equal(eps2, eps2_again)
    f = _value_and_grad(fused.noisy_concat, x, mu, scale, eps1, eps2, grad=grad, grad_hat=grad_hat)
    assert f[0].dtype == f[1].dtype == dtype and f[0].shape == (2 * x.shape[0], D)
    for a, b in zip(f, plain):
        torch.testing.assert_close(a, b, **TOL[dtype])
    torch.testing.assert_close(f[0][x.shape[0]:], f[1], rtol=0, atol=0)


def test_fused_noisy_concat_with_only_x_hat_used():
    x, mu, scale, eps1, eps2, grad = _tensors()
    results = []
    for fn in (fused.noisy_concat, method.noisy_concat):
        leaf = x.clone().requires_grad_()
        fn(leaf, mu, scale, eps1.clone(), eps2.clone())[1].backward(grad[: x.shape[0]])
        results.append(leaf.grad)
    torch.testing.assert_close(*results, **TOL[torch.float32])


def _s2moe(fused_paths, **kw):
    return S2MoE(D, FFN(D, 32), num_experts=4, fused=fused_paths, **kw)


@pytest.mark.parametrize("mask", [False, True])
def test_layer_fused_and_plain_noisy_pair_draw_the_same_x_hat(mask):
    x, *_, grad = _tensors(T=40)
    mask_T = None
    if mask:
        mask_T = torch.ones(40)
        mask_T[::4] = 0
    results = []
    for fused_paths in (True, False):
        layer = _s2moe(fused_paths, noise_scale=0.7)
        torch.manual_seed(5)
        results.append(_value_and_grad(lambda t: layer.noisy_pair(t, mask_T), x, grad=grad, grad_hat=grad[:40]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    # and x_hat is what the noise module draws from the same seed
    torch.manual_seed(5)
    torch.testing.assert_close(results[0][1], layer.noise(x, mask_T), **TOL[torch.float32])


@pytest.mark.parametrize("detach", [True, False])
def test_unmasked_statistics_equal_the_weighted_ones_with_all_weights_one(detach):
    x = (torch.randn(300, D, generator=torch.Generator().manual_seed(6)) * 3 + 5).requires_grad_()
    noise = method.GaussianNoise(1.0, "local", detach)
    fast, weighted = noise.statistics(x), noise.statistics(x, torch.ones(300))
    for a, b in zip(fast, weighted):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if not detach:  # the gradient through mu and sigma too
        grads = [torch.autograd.grad(sum(t.sum() for t in stats), x)[0] for stats in (fast, weighted)]
        torch.testing.assert_close(*grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(sample=False), dict(detach=False)])
def test_cases_outside_the_fused_path_take_the_plain_one(kw):
    x, *_, grad = _tensors(T=24)
    sample = kw.get("sample", True)
    results = []
    for fused_paths in (True, False):
        layer = _s2moe(fused_paths, noise_scale=1.0, detach_noise_stats=kw.get("detach", True))
        torch.manual_seed(2)
        results.append(_value_and_grad(lambda t: layer.noisy_pair(t, sample=sample), x, grad=grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mix_matches_the_plain_mix(dtype):
    g = torch.Generator().manual_seed(3)
    gate = torch.rand(32, 1, generator=g)
    y2 = torch.randn(64, D, generator=g).to(dtype)
    grad = torch.randn(32, D, generator=g).to(dtype)
    outs = []
    for ops in (fused, method):
        leaves = [gate.clone().requires_grad_(), y2.clone().requires_grad_()]
        out = ops.mix_paths(*leaves)
        out.backward(grad)
        outs.append((out.detach(), leaves[0].grad, leaves[1].grad))
    assert outs[0][0].dtype == outs[0][2].dtype == dtype and outs[0][1].dtype == torch.float32
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **TOL[a.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gate_logit_matches_the_plain_linear(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, D, generator=g).to(dtype)
    weight, bias = (torch.randn(1, D, generator=g) * 0.3).to(dtype), torch.randn(1, generator=g).to(dtype)
    grad = torch.randn(40, 1, generator=g)
    outs = []
    for ops in (fused, method):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = ops.mix_gate_logit(*leaves)
        out.backward(grad)
        outs.append((out.detach(), *[t.grad for t in leaves]))
    assert outs[0][0].dtype == torch.float32 and [t.dtype for t in outs[0][1:]] == [dtype] * 3
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("outputs", [1, 8], ids=["gate", "router"])
def test_fp32_linear_equals_the_plain_one_and_keeps_the_input_not_its_fp32_copy(dtype, outputs):
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, D, generator=g).to(dtype)
    weight = (torch.randn(outputs, D, generator=g) * 0.3).to(dtype)
    grad = torch.randn(40, outputs, generator=g)
    outs, saved = [], []
    for fn in (fused.fp32_linear, lambda a, w: F.linear(a.float(), w.float())):
        leaves = [t.clone().requires_grad_() for t in (x, weight)]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(*leaves)
        out.backward(grad)
        outs.append((out.detach(), *[t.grad for t in leaves]))
    assert outs[0][0].dtype == torch.float32 and [t.dtype for t in outs[0][1:]] == [dtype] * 2
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if dtype == torch.bfloat16:
        assert all(t.dtype == torch.bfloat16 for t in saved[:2]), "the fused path kept an fp32 copy"
        assert any(t.dtype == torch.float32 and t.shape == x.shape for t in saved[2:])  # the plain one does


def _layer_run(fused_paths, dtype, train=True, **kw):
    torch.manual_seed(0)
    layer = S2MoE(D, FFN(D, 32), **{"num_experts": 4, "k": 2, **kw}, fused=fused_paths).to(dtype).train(train)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    torch.manual_seed(7)
    parts = layer.forward_parts(x)
    grad = torch.randn(64, D, generator=torch.Generator().manual_seed(2)).to(dtype)
    balance, uncertainty = parts.losses["balance"], parts.losses["uncertainty"]
    torch.autograd.backward([parts.output, balance + uncertainty], [grad, torch.ones((), dtype=balance.dtype)])
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return parts, x.grad, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, dict(uncertainty_on="output"), dict(k=1, noise_scale=0.5)],
                         ids=["default", "uncertainty-on-output", "top1"])
def test_layer_fused_equals_plain_outputs_losses_and_gradients(dtype, kw):
    (f_parts, f_xgrad, f_grads), (p_parts, p_xgrad, p_grads) = (_layer_run(f, dtype, **kw) for f in (True, False))
    tol = TOL[dtype]
    # Routing must be the same (the same x_hat), or nothing else can match.
    torch.testing.assert_close(f_parts.metrics["expert_counts"], p_parts.metrics["expert_counts"], rtol=0, atol=0)
    torch.testing.assert_close(f_parts.output, p_parts.output, **tol)
    for name in ("uncertainty", "balance"):
        torch.testing.assert_close(f_parts.losses[name], p_parts.losses[name], **TOL[torch.float32])
    torch.testing.assert_close(f_xgrad, p_xgrad, **tol)
    assert set(f_grads) == set(p_grads)
    for name in p_grads:
        torch.testing.assert_close(f_grads[name], p_grads[name], **tol, msg=name)


def test_eval_mean_noise_is_unchanged_by_the_fused_flag():
    (f_parts, _, _), (p_parts, _, _) = (_layer_run(f, torch.float32, train=False, eval_noise="mean")
                                        for f in (True, False))
    torch.testing.assert_close(f_parts.output, p_parts.output, rtol=1e-6, atol=1e-7)


def test_the_fused_layer_mixes_inside_deepspeeds_combine_and_falls_back_where_it_cannot():
    """The fused layer sums each token's clean and noisy routes, weighted by g and 1 - g, in
    DeepSpeed's combine; where the dispatch is not the plain one (here: DeepSpeed's wall-clock
    timers on) it mixes after the dispatch instead, with the same result."""
    torch.manual_seed(0)
    layer = S2MoE(D, FFN(D, 32), num_experts=4, k=2).train()
    with torch.no_grad():
        layer.mix_gate.weight.normal_()  # g varies per token, so a swapped g / 1 - g would show
    assert layer.mixes_in_combine()
    assert not S2MoE(D, FFN(D, 32), num_experts=4, k=2, uncertainty_on="output").mixes_in_combine()
    assert not S2MoE(D, FFN(D, 32), num_experts=4, k=2, fused=False).mixes_in_combine()
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    runs = []
    for timers in (False, True):
        layer.deepspeed_moe.wall_clock_breakdown = timers
        assert layer.mixes_in_combine() is not timers
        leaf = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = layer.forward_parts(leaf).output
        out.backward(torch.ones_like(out))
        runs.append((out.detach(), leaf.grad, layer.mix_gate.weight.grad))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def _info_nce_run(fn, a, b, grad_scale, requires=(True, True)):
    leaves = [t.clone().requires_grad_(r) for t, r in zip((a, b), requires)]
    loss = fn(*leaves, 0.1)
    # A scaled loss inside a bigger graph, as the layer's l_aux uses it.
    (grad_scale * loss + leaves[0].float().sum() * 0).backward()
    return loss.detach(), *[t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("requires", [(True, True), (True, False), (False, True)], ids=["both", "anchor", "positive"])
def test_fused_info_nce_matches_the_plain_loss_and_gradients(dtype, requires):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(96, D, generator=g).to(dtype)
    b = (a.float() + 0.7 * torch.randn(96, D, generator=g)).to(dtype)
    a[3] = 0  # a zero row: F.normalize's eps branch
    with_fused = _info_nce_run(fused.info_nce, a, b, 0.3, requires)
    plain = _info_nce_run(method.info_nce, a, b, 0.3, requires)
    assert with_fused[0].dtype == plain[0].dtype
    for f, p in zip(with_fused, plain):
        if p is None:
            assert f is None
            continue
        assert f.dtype == p.dtype
        torch.testing.assert_close(f, p, **TOL.get(f.dtype, dict(rtol=1e-10, atol=1e-12)))


def test_fused_info_nce_gradient_is_exact():
    g = torch.Generator().manual_seed(6)
    a, b = (torch.randn(7, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(lambda u, v: fused.info_nce(u, v, 0.2), (a, b))


@pytest.mark.parametrize("tau", [0.1, 0.02, 0.005])
def test_fused_info_nce_loss_is_the_plain_one_at_any_temperature(tau):
    """Above 0.05 the fused loss is the log of the softmax it computes for the gradient, below it
    log_softmax (a softmax entry can underflow there); both equal the plain loss, also for rows
    that are nearly copies of each other, where the logits spread most."""
    g = torch.Generator().manual_seed(8)
    a = torch.randn(64, D, generator=g)
    b = a + 0.01 * torch.randn(64, D, generator=g)
    fused_loss = fused.info_nce(a.clone().requires_grad_(), b.clone().requires_grad_(), tau)
    plain_loss = method.info_nce(a, b, tau)
    assert torch.isfinite(fused_loss)
    torch.testing.assert_close(fused_loss.detach(), plain_loss, rtol=1e-5, atol=1e-6)


def test_fused_info_nce_keeps_no_square_matrix_for_backward():
    """The memory it exists for: the plain graph keeps N x N fp32 log-probabilities (and the
    normalised rows), the fused one only the two [N, D] gradients."""
    N = 256
    saved = {}
    for name, fn in (("fused", fused.info_nce), ("plain", method.info_nce)):
        a, b = (torch.randn(N, D).requires_grad_() for _ in range(2))
        sizes = []

        def pack(t, inputs=(a, b), sizes=sizes):
            if not any(t is i for i in inputs):  # the inputs live on anyway
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(a, b, 0.1)
        saved[name] = sum(sizes)
    assert saved["fused"] == 2 * N * D
    assert saved["plain"] >= N * N
