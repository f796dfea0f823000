"""The top-k router: top-1 without token drops (which DeepSpeed 0.19's own gating cannot do)."""

import pytest
import torch
from deepspeed.moe.layer import MoE

from s2moe_ds.models import build_model
from s2moe_ds.moe import FFN, TopKRouter
from s2moe_ds.moe.routing import Routing
from s2moe_ds.train import model_preset

D, E = 16, 4


def _moe(drop_tokens, capacity_factor=1.0):
    """DeepSpeed's MoE with our top-k router as its gate, called by DeepSpeed's own forward."""
    torch.manual_seed(0)
    moe = MoE(D, FFN(D, 32), num_experts=E, k=1, drop_tokens=drop_tokens, use_rts=False,
              capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor)
    routing = Routing(E, k=1, eval_k=1, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                      drop_tokens=drop_tokens, eval_drop_tokens=drop_tokens, use_rts=False)
    moe.deepspeed_moe.gate = TopKRouter(D, routing)
    return moe


def _dropped_fraction(moe, x):
    return float(moe.deepspeed_moe.gate.route(x).metrics["dropped_fraction"])


def _skewed_tokens(T=64):
    # Most tokens prefer one expert, so a capacity-1.0 gate would drop many of them.
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    return x + 3.0 * torch.randn(1, D, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("training", [False, True])
def test_top1_without_drops_routes_every_token_like_an_unbounded_capacity(training):
    x = _skewed_tokens()
    no_drop = _moe(drop_tokens=False).train(training)
    # A capacity of every token for every expert: nothing can be dropped.
    unbounded = _moe(drop_tokens=True, capacity_factor=float(E)).train(training)
    unbounded.load_state_dict(no_drop.state_dict())
    out, _, counts = no_drop(x)
    ref, _, ref_counts = unbounded(x)
    torch.testing.assert_close(out, ref)
    assert int(counts.max()) > x.shape[0] // E  # the case where capacity 1.0 would drop routes
    assert _dropped_fraction(no_drop, x) == 0.0
    # The gate's own settings are restored after the call.
    assert no_drop.deepspeed_moe.gate.drop_tokens is False
    assert no_drop.deepspeed_moe.gate.capacity_factor == 1.0


def test_dropping_gate_still_drops():
    moe = _moe(drop_tokens=True).eval()
    moe(_skewed_tokens())
    assert _dropped_fraction(moe, _skewed_tokens()) > 0.0


def test_deepspeed_moe_model_evaluates_top1_with_padding():
    torch.manual_seed(0)
    cfg = model_preset("tiny", vocab_size=32, d_model=16, d_inner=32, max_seq_len=16,
                       moe=dict(block="moe", num_experts=4, k=2, eval_k=1))
    model = build_model(cfg).eval()
    x = torch.randint(0, 32, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 8:] = 0
    out = model(x, x, mask)
    assert torch.isfinite(out.task_loss)
    # Padding changes nothing for the real tokens: same loss as the real rows alone.
    alone = model(x[:1], x[:1])
    first_row_nll = torch.nn.functional.cross_entropy(out.logits[0], x[0])
    torch.testing.assert_close(first_row_nll, alone.task_loss)
