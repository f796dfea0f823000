"""The noise module: x_hat = N1 * x + N2 with the moments docs/method.md gives, per feature."""

import pytest
import torch

from s2moe_ds.moe.method import GaussianNoise, draw_eps

from ..harness import run_distributed


def _tokens(T=8192, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.tensor([0.0, 3.0, -2.0])
    scale = torch.tensor([1.0, 0.5, 4.0])
    return loc + scale * torch.randn(T, 3, generator=g)


@pytest.mark.parametrize("shape", [(4096, 256), (64, 32), (5, 16), (7, 3), (3, 24)])
def test_the_noise_draw_is_one_joint_draw_of_both_tensors(shape):
    """The RNG stream is part of the results: eps1 and eps2 are the numbers of ONE [2, T, D] draw,
    whether draw_eps makes them with two draws (T * D a multiple of 16, so that each can be freed
    on its own) or one."""
    x = torch.zeros(shape)
    torch.manual_seed(11)
    eps1, eps2 = draw_eps(x)
    after = torch.rand(())
    torch.manual_seed(11)
    joint = torch.randn((2, ) + shape)
    assert torch.equal(eps1, joint[0]) and torch.equal(eps2, joint[1])
    assert torch.equal(after, torch.rand(())), "the draw consumed another amount of the RNG stream"
    assert eps1.dtype == eps2.dtype == torch.float32


def test_statistics_are_the_per_feature_mean_and_population_std():
    x = _tokens()
    mu, sigma = GaussianNoise(1.0, "local", True).statistics(x)
    torch.testing.assert_close(mu, x.mean(0))
    torch.testing.assert_close(sigma, x.std(0, correction=0))


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_x_hat_has_the_conditional_moments_of_the_method(scale):
    # Given x: E[x_hat] = x + mu and Var[x_hat] = s^2 sigma^2 (x^2 + 1), feature by feature.
    x = _tokens()
    noise = GaussianNoise(scale, "local", True)
    mu, sigma = noise.statistics(x)
    torch.manual_seed(1)
    x_hat = noise(x)
    z = (x_hat - x - mu) / (scale * sigma * (x**2 + 1).sqrt())
    T = x.shape[0]
    assert (z.mean(0).abs() < 5 / T**0.5).all(), z.mean(0)
    assert ((z.var(0) - 1).abs() < 0.06).all(), z.var(0)
    # and the noise is independent per element: features and tokens are uncorrelated
    corr = torch.corrcoef(z.t())
    assert (corr - torch.eye(3)).abs().max() < 5 / T**0.5


def test_zero_scale_and_mean_mode_shift_by_mu_only():
    x = _tokens(256)
    mu, _ = GaussianNoise(1.0, "local", True).statistics(x)
    torch.testing.assert_close(GaussianNoise(0.0, "local", True)(x), x + mu)
    torch.testing.assert_close(GaussianNoise(1.0, "local", True)(x, sample=False), x + mu)


def test_padding_is_left_out_of_the_statistics():
    x = _tokens(512)
    mask = torch.ones(512)
    mask[::3] = 0
    padded = x.clone()
    padded[mask == 0] = 1e4  # garbage in padding must not move the statistics
    mu, sigma = GaussianNoise(1.0, "local", True).statistics(padded, mask)
    kept = x[mask == 1]
    torch.testing.assert_close(mu, kept.mean(0))
    torch.testing.assert_close(sigma, kept.std(0, correction=0))


def test_bf16_tokens_get_fp32_statistics_and_a_bf16_copy():
    x = _tokens(1024).to(torch.bfloat16)
    x_hat = GaussianNoise(1.0, "local", True)(x)
    assert x_hat.dtype == torch.bfloat16
    mu, _ = GaussianNoise(1.0, "local", True).statistics(x)
    assert mu.dtype == torch.float32


@pytest.mark.parametrize("detach", [True, False])
def test_detach_noise_stats_controls_the_gradient_through_mu_and_sigma(detach):
    x = _tokens(64).requires_grad_()
    noise = GaussianNoise(1.0, "local", detach)
    torch.manual_seed(3)
    x_hat = noise(x)
    (x_hat * torch.linspace(-1, 1, 3)).sum().backward()
    # With constant statistics, d x_hat / d x = N1 = 1 + s * sigma * eps1 elementwise.
    _, sigma = noise.statistics(x.detach())
    torch.manual_seed(3)
    eps1 = torch.randn(2, 64, 3)[0]
    expected = (1 + sigma * eps1) * torch.linspace(-1, 1, 3)
    if detach:
        torch.testing.assert_close(x.grad, expected)
    else:
        assert (x.grad - expected).abs().max() > 1e-3


def _global_stats_worker(rank, world_size):
    tokens = [_tokens(100 + 37 * r, seed=r) for r in range(world_size)]
    mask = torch.ones(tokens[rank].shape[0])
    mask[-5:] = 0
    everything = torch.cat([t[:-5] for t in tokens])
    mu, sigma = GaussianNoise(1.0, "global", True).statistics(tokens[rank], mask)
    torch.testing.assert_close(mu, everything.mean(0))
    torch.testing.assert_close(sigma, everything.std(0, correction=0))
    local_mu, _ = GaussianNoise(1.0, "local", True).statistics(tokens[rank], mask)
    torch.testing.assert_close(local_mu, tokens[rank][:-5].mean(0))
    # Not detached: the statistics take part in autograd through a differentiable all-reduce.
    x = tokens[rank].clone().requires_grad_()
    mu, sigma = GaussianNoise(1.0, "global", False).statistics(x)
    (mu.sum() + sigma.sum()).backward()
    return x.grad.abs().sum().item()


def test_global_statistics_cover_every_rank():
    grads = run_distributed(_global_stats_worker, world_size=2)
    assert all(g > 0 for g in grads)
