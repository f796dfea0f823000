"""The balance loss and InfoNCE weigh the same in the update whatever data-parallel size, micro-batch
size and gradient accumulation make up one global batch (the 1/dp and 1/micro-batch scaling bugs
reported against Megatron and NeMo).

What holds by definition, and is asserted here: both losses are defined per micro-batch (DeepSpeed's
balance loss is E^2 * mean_e(mean prob_e * share of first choices_e) of the micro-batch's tokens,
a nonlinear function of its statistics; S2MoE's copy x_hat = x + mu takes mu from the micro-batch,
and InfoNCE's negatives are the micro-batch's other tokens). So the gradient the optimizer sees
after DeepSpeed's engine.backward (loss / accumulation steps, then the average over data-parallel
ranks) must be

    mean over the global batch's M = dp * accum micro-batches m of grad(coef * L(m)),

one single-process reference computed by hand per micro-batch grouping. Then
- (dp=2, micro=G/2, accum=1) equals (dp=1, micro=G/2, accum=2): the same micro-batches, so ranks
  and accumulation steps must weigh them alike (a missing or extra 1/dp or 1/accum fails);
- (dp=1, micro=G, accum=1) equals the gradient of the loss on the whole batch;
- with the SMoE block, the task loss, a mean over tokens of per-token terms, gives the same gradient
  in all three (the control: only the per-micro-batch losses may differ across micro-batch sizes).
  Not with S2MoE: its output mixes in SMoE(x + mu), mu the micro-batch's mean, so even its task
  loss is per micro-batch by definition (the reference above covers it).
The coefficient is in the reference, so the same coefficient means the same weight relative to
the task loss in every split.

Routing does not depend on the split: ep_size 1, no token drops (drop_tokens False), no Gumbel
second expert, S2MoE's noise_scale 0 and InfoNCE on every token of the micro-batch
(uncertainty_tokens above its token count), dropout 0; ZeRO 0, fp32, gradients read before the
optimizer step.
"""

import pytest
import torch

from s2moe_ds.models import build_model
from s2moe_ds.moe import total_loss
from s2moe_ds.train import model_preset

from ..harness import run_distributed

V, G, T = 20, 4, 8  # vocabulary, sequences in the global batch, tokens per sequence
BLOCKS = ("s2moe", "moe")
TERMS = {"s2moe": ("task", "balance", "uncertainty", "total"), "moe": ("task", "balance", "total")}
SPLITS = {"dp1-micro4-accum1": (1, G, 1), "dp1-micro2-accum2": (1, G // 2, 2), "dp2-micro2-accum1": (2, G // 2, 1)}
ROUTER = "blocks.0.ffn.deepspeed_moe.gate.wg.weight"
EXPERT = "blocks.0.ffn.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"
ATTENTION = "blocks.0.attn.qkv.weight"
REACHES = {"task": (ROUTER, EXPERT, ATTENTION), "balance": (ROUTER, ATTENTION), "uncertainty": (ATTENTION,),
           "total": (ROUTER, EXPERT, ATTENTION)}
"""Parameters each term's gradient must reach (nonzero), so that comparing them can fail: the
balance loss reaches the router and, through the router's input, the attention; InfoNCE on the
layer's input reaches the attention only."""


def _model(block):
    torch.manual_seed(0)
    moe = dict(block=block, num_experts=4, k=2, drop_tokens=False, router_config=dict(top2_2nd_expert_sampling=False))
    if block == "s2moe":
        moe["block_config"] = dict(noise_scale=0.0, uncertainty_coef=0.1, uncertainty_tokens=G * T)
    cfg = model_preset("tiny", vocab_size=V, d_model=16, n_head=2, d_inner=32, max_seq_len=T, n_layer=1, dropout=0.0,
                       moe=moe)
    return build_model(cfg), cfg.moe.loss_terms()


def _batch():
    idx = torch.randint(0, V, (G, T + 1), generator=torch.Generator().manual_seed(1))
    return idx[:, :-1], idx[:, 1:]


def _term(out, terms, name):
    """The 0-dim loss whose gradient is compared: the task loss, one named term times its
    coefficient, or the total the trainer back-propagates."""
    if name == "task":
        return out.task_loss
    chosen = terms if name == "total" else {name: terms[name]}
    task = out.task_loss if name == "total" else out.task_loss.new_zeros(())
    return total_loss(task, out.layer_losses, chosen)[0]


def _engine_grads(model, terms, rank, dp, micro, accum, names):
    """{term: {param: the gradient the optimizer would see}} for one split, from DeepSpeed's engine."""
    from deepspeed.utils import safe_get_full_grad
    from s2moe_ds.parallel import initialize
    ds_config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
                 "zero_optimization": {"stage": 0}, "steps_per_print": 10**6}
    # lr 0: the weights stay, so each term's gradient is taken at the same point.
    engine, _, _, _ = initialize(model, ds_config, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    engine.train()
    idx, targets = _batch()
    grads = {}
    for name in names:
        for step in range(accum):
            first = (rank * accum + step) * micro  # this micro-batch's sequences of the global batch
            out = engine(idx[first:first + micro], targets[first:first + micro])
            engine.backward(_term(out, terms, name))
            if step == accum - 1:
                grads[name] = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
            engine.step()
    return grads


def _splits_worker(rank, world_size):
    """Every split with world_size ranks, for both block kinds: {block: {split: grads}} of this rank."""
    results = {}
    for block in BLOCKS:
        for split, (dp, micro, accum) in SPLITS.items():
            if dp == world_size:
                model, terms = _model(block)
                results.setdefault(block, {})[split] = _engine_grads(model, terms, rank, dp, micro, accum, TERMS[block])
    return results


def _reference(block, micro):
    """mean over the micro-batches of `micro` sequences of grad(term on the micro-batch), one
    process, plain autograd."""
    model, terms = _model(block)
    model.train()
    idx, targets = _batch()
    grads = {}
    for name in TERMS[block]:
        model.zero_grad()
        for first in range(0, G, micro):
            (_term(model(idx[first:first + micro], targets[first:first + micro]), terms, name) * micro / G).backward()
        grads[name] = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                       for n, p in model.named_parameters()}
    return grads


@pytest.fixture(scope="module")
def engine_grads():
    one = run_distributed(_splits_worker, world_size=1)[0]
    two = run_distributed(_splits_worker, world_size=2)
    for block in BLOCKS:
        split = "dp2-micro2-accum1"
        for name in TERMS[block]:  # the averaged gradient is the same on both ranks
            for param, g in two[0][block][split][name].items():
                torch.testing.assert_close(two[1][block][split][name][param], g, rtol=0, atol=0)
        one[block][split] = two[0][block][split]
    return one


def _assert_grads_equal(actual, expected, what):
    assert actual.keys() == expected.keys()
    for param, g in expected.items():
        torch.testing.assert_close(actual[param], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}, {param}: {m}")


@pytest.mark.parametrize("block", BLOCKS)
def test_ranks_and_accumulation_steps_weigh_the_same_micro_batches_alike(engine_grads, block):
    for name in TERMS[block]:
        by_ranks, by_steps = (engine_grads[block][split][name] for split in ("dp2-micro2-accum1", "dp1-micro2-accum2"))
        _assert_grads_equal(by_ranks, by_steps, f"{block} {name}: dp 2 vs accumulation 2")


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("split", SPLITS)
def test_each_split_sees_the_mean_of_its_micro_batches_gradients(engine_grads, block, split):
    reference = _reference(block, SPLITS[split][1])
    for name in TERMS[block]:
        for param in REACHES[name]:
            assert reference[name][param].abs().max() > 0, f"{block} {name} does not reach {param}"
        _assert_grads_equal(engine_grads[block][split][name], reference[name], f"{block} {name} in {split}")


def test_the_smoe_task_loss_gradient_is_the_same_in_every_split(engine_grads):
    whole = engine_grads["moe"]["dp1-micro4-accum1"]["task"]
    for split in SPLITS:
        _assert_grads_equal(engine_grads["moe"][split]["task"], whole, f"moe task in {split}")
