"""An eval-mode forward changes nothing in the model: every parameter and buffer stays
bit-identical, for every block kind and router (StableMoE's token table, X-MoE's temperature and
SMoE-Dropout's schedule included) on both backbones. Evaluating in the middle of a run must not
move the run."""

import pytest
import torch

from s2moe_ds.models import build_model
from s2moe_ds.moe import BLOCKS, ROUTERS
from s2moe_ds.train import model_preset

from ..runs import ROUTER_SETTINGS as RUNS_ROUTER_SETTINGS

V = 50

ROUTER_SETTINGS = {**RUNS_ROUTER_SETTINGS, "xmoe-sister": dict(xmoe_sister=True)}
"""Every router, and X-MoE's sister variant, which keeps its expert embeddings at norm 1.5 by
rescaling them in training."""

CASES = [(block, None) for block in BLOCKS if not BLOCKS[block].routed] + \
        [(block, router) for block in BLOCKS if BLOCKS[block].routed for router in ROUTER_SETTINGS]


def _model(backbone, block, router):
    torch.manual_seed(0)
    moe = dict(block=block, num_experts=4, eval_capacity_factor=4.0)
    if router is not None:
        moe.update(router=router.split("-")[0], router_config=ROUTER_SETTINGS[router])
    cfg = model_preset("tiny", vocab_size=V, d_model=16, d_inner=32, max_seq_len=16, backbone=backbone, moe=moe)
    return build_model(cfg)


def _tensors(model):
    named = dict(model.named_parameters())
    named.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    return {n: t.detach().clone() for n, t in named.items()}


def test_every_router_has_settings_here():
    assert set(ROUTERS) <= {name.split("-")[0] for name in ROUTER_SETTINGS}, "give a new router its settings above"


@pytest.mark.parametrize("backbone", ["gpt", "txl"])
@pytest.mark.parametrize("block,router", CASES, ids=[f"{b}-{r}" if r else b for b, r in CASES])
def test_an_eval_forward_leaves_every_parameter_and_buffer_bit_identical(backbone, block, router):
    model = _model(backbone, block, router)
    # A few training steps first, so that the weights have moved since the last training forward
    # (an eval forward must not, e.g., renormalise them) and state a router keeps has moved.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        model.train()
        idx_BT = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(idx_BT, idx_BT).task_loss.backward()
        optimizer.step()
    model.eval()
    before = _tensors(model)
    with torch.no_grad():
        for seed in range(2):
            model(torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(10 + seed)))
    after = _tensors(model)
    assert after.keys() == before.keys()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"an eval forward changed {changed}"
