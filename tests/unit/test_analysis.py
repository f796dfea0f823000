"""The analysis metrics on constructed cases whose answer is known."""

import math

import pytest
import torch

from s2moe_ds.eval.analysis import (ExpertAnalyzer, effective_rank, expert_output_similarity,
                                    expert_weight_similarity, normalized_entropy, public)
from s2moe_ds.models import build_model
from s2moe_ds.moe import FFN, expert_blocks
from s2moe_ds.train import model_preset


def test_normalized_entropy_is_one_for_uniform_and_zero_for_one_expert():
    assert normalized_entropy(torch.ones(8)) == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([0.0, 5.0, 0.0, 0.0])) == pytest.approx(0.0)
    assert 0 < normalized_entropy(torch.tensor([1.0, 2.0, 3.0])) < 1


def test_effective_rank_counts_the_directions_in_use():
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    assert effective_rank(q[:5] * 3.0, center=False) == pytest.approx(5.0)  # 5 equal directions
    line = torch.randn(100, 1) * torch.randn(1, 16)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-4)  # all tokens on one line: collapse
    assert effective_rank(torch.ones(10, 16) * 2.0) == 0.0  # no variation left after centring
    iso = torch.randn(4000, 16, generator=torch.Generator().manual_seed(1))
    assert 15.0 < effective_rank(iso) <= 16.0


def _experts(n, d=8, hidden=16, seed=0):
    torch.manual_seed(seed)
    return [FFN(d, hidden) for _ in range(n)]


def test_identical_experts_have_similarity_one_and_negated_ones_minus_one():
    a, b, c = _experts(3)
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    with torch.no_grad():
        c.fc2.weight.neg_()
        c.fc2.bias.neg_()
    x = torch.randn(50, 8)
    out = expert_output_similarity([a, b, c], x)
    assert out[0, 1].item() == pytest.approx(1.0) and out[0, 2].item() == pytest.approx(-1.0)
    assert torch.allclose(out.diagonal(), torch.ones(3, dtype=out.dtype))
    w = expert_weight_similarity([a, b])
    assert w[0, 1].item() == pytest.approx(1.0)
    different = expert_weight_similarity(_experts(2, seed=3))
    assert abs(different[0, 1].item()) < 0.3  # independent random weights are nearly orthogonal


def _model(block="s2moe", num_experts=4, n_layer=2):
    torch.manual_seed(0)
    cfg = model_preset("tiny", vocab_size=32, d_model=16, d_inner=32, n_layer=n_layer, max_seq_len=16,
                       moe=dict(block=block, num_experts=num_experts, k=2, eval_k=1))
    return build_model(cfg).eval()


def _analyse(model, batches, sample_tokens=64):
    analyzer = ExpertAnalyzer(model, sample_tokens=sample_tokens)
    with analyzer, torch.no_grad():
        for x, mask in batches:
            analyzer.set_tokens(x, mask)
            model(x, mask_BT=mask)
    return analyzer.report()


def _batches(n=3, B=4, T=16, vocab=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(B, T, dtype=torch.long)
        mask[-1, T // 2:] = 0  # padding the analysis must leave out
        out.append((torch.randint(0, vocab, (B, T), generator=g), mask))
    return out


def test_uniform_router_has_maximal_router_entropy_and_ties_all_go_to_one_expert():
    model = _model()
    for layer in expert_blocks(model):
        torch.nn.init.zeros_(layer.deepspeed_moe.gate.wg.weight)
    report = _analyse(model, _batches())
    for layer in report["layers"]:
        assert layer["router_entropy_mean"] == pytest.approx(1.0)
        # Equal probabilities: the tie goes the same way for every token.
        assert max(layer["top1_share"]) == pytest.approx(1.0)
        assert layer["utilisation_entropy"] == pytest.approx(0.0)
        assert layer["router_prob_mean"] == pytest.approx([0.25] * 4)


def test_counts_cover_every_unmasked_token_once_and_shares_are_distributions():
    batches = _batches()
    report = _analyse(_model(), batches, sample_tokens=40)
    real = sum(int(m.sum()) for _, m in batches)
    for layer in report["layers"]:
        assert layer["tokens"] == real
        assert sum(layer["top1_share"]) == pytest.approx(1.0)
        assert sum(layer["topk_share"]) == pytest.approx(1.0)
        assert layer["sample_tokens"] == 40
        for row in layer["routing_heatmap"]["p_expert_given_token"]:
            assert sum(row) == pytest.approx(1.0)
        assert sum(r["tokens"] for r in layer["effective_rank_per_expert"]) == 40
        assert 0.0 <= layer["utilisation_entropy"] <= 1.0


def test_evenly_spread_routing_has_utilisation_entropy_one():
    model = _model(n_layer=1)
    E, D = 4, 16
    layer = expert_blocks(model)[0]
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(torch.eye(E, D))
    x_TD = (torch.eye(D)[:E] * 10.0).repeat(8, 1)  # 32 tokens, each pointing at one expert's gate row
    analyzer = ExpertAnalyzer(model, sample_tokens=64)
    with analyzer, torch.no_grad():
        analyzer.set_tokens(torch.zeros(1, x_TD.shape[0], dtype=torch.long))
        layer.deepspeed_moe(x_TD, None)
    entry = analyzer.report()["layers"][0]
    assert entry["top1_share"] == pytest.approx([0.25] * 4)
    assert entry["utilisation_entropy"] == pytest.approx(1.0)


def test_mix_gate_at_initialisation_is_one_half_everywhere():
    report = _analyse(_model(), _batches())
    for layer in report["layers"]:
        g = layer["mix_gate"]
        assert g["mean"] == pytest.approx(0.5) and g["std"] == pytest.approx(0.0, abs=1e-12)
        assert g["histogram_0_1_20_bins"][10] == layer["sample_tokens"]
    assert "_values" not in str(public(report))


def test_smoe_models_are_analysed_without_a_mix_gate():
    report = _analyse(_model(block="moe"), _batches())
    assert all(layer["block"] == "moe" and layer["router"] == "topk" and "mix_gate" not in layer
               for layer in report["layers"])


def test_dense_models_are_refused():
    with pytest.raises(ValueError, match="no MoE layers"):
        ExpertAnalyzer(_model(block="dense"))


def test_normalized_entropy_matches_a_hand_computed_value():
    p = torch.tensor([0.5, 0.25, 0.25])
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(3)
    assert normalized_entropy(p) == pytest.approx(expected)
