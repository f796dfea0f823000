"""The InfoNCE uncertainty loss against a float64 reference, and its bounded memory."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from s2moe_ds.moe import FFN, S2MoE
from s2moe_ds.moe.method import info_nce, sampled_info_nce
from s2moe_ds.moe.method import sample_rows


SIM = {
    "cosine": lambda u, v: float(u @ v / (u.norm() * v.norm())),
    "dot": lambda u, v: float(u @ v),
    "neg_sq_distance": lambda u, v: -float((u - v).square().sum()),
}


def _reference(a, b, tau, kind="cosine"):
    a, b = a.double(), b.double()
    total = 0.0
    for i in range(a.shape[0]):
        sims = [SIM[kind](a[i], b[j]) / tau for j in range(b.shape[0])]
        top = max(sims)
        total += -sims[i] + top + math.log(sum(math.exp(s - top) for s in sims))
    return total / a.shape[0]


def test_info_nce_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 5, generator=g)
    b = a + 0.5 * torch.randn(12, 5, generator=g)
    for tau in (0.1, 0.5, 1.0):
        assert abs(info_nce(a, b, tau).item() - _reference(a, b, tau)) < 1e-5
    # The positive pairing matters: matched pairs give a lower loss than shuffled ones.
    assert info_nce(a, b, 0.1) < info_nce(a, b[torch.randperm(12, generator=g)], 0.1)


def test_every_similarity_matches_its_float64_reference_and_reaches_the_layer():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(10, 4, generator=g)
    b = a + 0.3 * torch.randn(10, 4, generator=g)
    for kind in SIM:
        assert abs(info_nce(a, b, 2.0, kind).item() - _reference(a, b, 2.0, kind)) < 1e-5, kind
        u, v = (t.double().requires_grad_() for t in (a, b))
        assert torch.autograd.gradcheck(lambda u, v: info_nce(u, v, 2.0, kind), (u, v)), kind
    # Only the cosine ignores the scale of the features.
    assert info_nce(3 * a, 3 * b, 2.0) == pytest.approx(info_nce(a, b, 2.0).item(), abs=1e-6)
    assert info_nce(3 * a, 3 * b, 2.0, "dot") != pytest.approx(info_nce(a, b, 2.0, "dot").item(), abs=1e-3)
    # The layer's L_u is InfoNCE with the configured similarity, fused or not.
    x = torch.randn(32, 8, generator=g)
    for kind in SIM:
        losses = []
        for fused in (True, False):
            torch.manual_seed(0)
            layer = S2MoE(8, FFN(8, 16), num_experts=4, k=2, uncertainty_similarity=kind, uncertainty_tau=2.0,
                          fused=fused).train()
            torch.manual_seed(1)
            x_hat = layer.noisy_pair(x)[1]
            torch.manual_seed(1)
            losses.append(layer.forward_parts(x).losses["uncertainty"].item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-5), kind
        assert losses[0] == pytest.approx(_reference(x, x_hat, 2.0, kind), abs=1e-4), kind


def test_info_nce_gradient_is_exact():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, v: info_nce(u, v, 0.2), (a, b))


def test_sampled_loss_uses_the_drawn_rows_and_skips_padding():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    torch.manual_seed(5)
    loss = sampled_info_nce(a, b, 0.1, 64)
    torch.manual_seed(5)
    idx = sample_rows(300, 64, None, "cpu")
    assert idx.numel() == 64 and idx.unique().numel() == 64
    torch.testing.assert_close(loss, info_nce(a[idx], b[idx], 0.1))
    # Few tokens: all of them, no random draw.
    torch.testing.assert_close(sampled_info_nce(a[:50], b[:50], 0.1, 64), info_nce(a[:50], b[:50], 0.1))
    mask = torch.ones(300)
    mask[::2] = 0
    a_pad = a.clone()
    a_pad[mask == 0] = float("nan")
    assert torch.isfinite(sampled_info_nce(a_pad, b, 0.1, 64, mask))
    torch.testing.assert_close(sampled_info_nce(a_pad, b, 0.1, 1000, mask), info_nce(a[1::2], b[1::2], 0.1))


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out, )):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_bounded_for_large_token_counts():
    T, D = 16384, 16
    a, b = torch.randn(T, D), torch.randn(T, D)
    with _LargestTensor() as probe:
        sampled_info_nce(a, b, 0.1, 512)
    assert probe.largest <= max(512 * 512, T)  # the permutation is the only O(T) tensor
    # The whole layer, forward and backward: nothing near T x T (2.7e8 elements) is built.
    layer = S2MoE(D, FFN(D, 32), num_experts=4, k=2)
    x = torch.randn(T, D, requires_grad=True)
    with _LargestTensor() as probe:
        out, l_aux, _ = layer(x)
        (out.sum() + l_aux).backward()
    assert probe.largest < 16 * T * D, probe.largest
