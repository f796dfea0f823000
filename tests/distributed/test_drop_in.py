"""The drop-in S2MoE(...) where code written for deepspeed.moe.layer.MoE relies on it: DeepSpeed's
residual MoE (use_residual=True, PR-MoE) with DeepSpeed's parameters, DeepSpeed's numbers in eval,
and a residual layer trained, checkpointed and reloaded by DeepSpeed's engine.
(bench/deepspeed_moe_tests.py runs DeepSpeed's own MoE tests with S2MoE swapped in.)"""

import os

import pytest
import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import nn

from s2moe_ds.moe import FFN, S2MoE
from s2moe_ds.moe.blocks.residual import residual_mix
from s2moe_ds.parallel import initialize

from ..harness import run_distributed

D, E = 16, 4
OURS_ONLY = {"mix_gate.weight", "mix_gate.bias"}


def _layers(use_residual, **routing):
    """S2MoE and DeepSpeed's MoE with the same arguments and weights (DeepSpeed's gate randomness
    off, which S2MoE's eval never uses)."""
    torch.manual_seed(0)
    ours = S2MoE(D, FFN(D, 32), num_experts=E, use_residual=use_residual, **routing)
    theirs = MoE(D, FFN(D, 32), num_experts=E, use_residual=use_residual, use_rts=False,
                 top2_2nd_expert_sampling=False, **routing)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and set(unexpected) == OURS_ONLY
    return ours, theirs


def _x(T=64, seed=1):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def test_residual_parameters_have_deepspeeds_names_and_shapes():
    expert = FFN(D, 32)
    ours = S2MoE(D, expert, num_experts=E, use_residual=True)
    theirs = MoE(D, FFN(D, 32), num_experts=E, use_residual=True)
    shapes = {name: tuple(p.shape) for name, p in ours.state_dict().items() if name not in OURS_ONLY}
    assert shapes == {name: tuple(p.shape) for name, p in theirs.state_dict().items()}
    assert shapes["coefficient.weight"] == (2, D) and shapes["coefficient.bias"] == (2,)
    # As in DeepSpeed, the dense MLP is the module given as expert (the experts are copies of it).
    assert ours.mlp is expert and ours.use_residual
    assert not any("mlp" in n or "coefficient" in n for n in S2MoE(D, FFN(D, 32), num_experts=E).state_dict())


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("use_residual", [True, False], ids=["residual", "plain"])
def test_eval_gives_deepspeeds_numbers(use_residual, k):
    ours, theirs = _layers(use_residual, k=k, capacity_factor=2.0, eval_capacity_factor=0.5)
    x = _x().reshape(4, 16, D)  # [batch, seq, D], as a model passes it
    out, l_aux, counts = ours.eval()(x)
    ref_out, ref_aux, ref_counts = theirs.eval()(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(l_aux, ref_aux)
    assert torch.equal(counts, ref_counts)


def test_the_coefficient_weighs_the_moe_output_against_the_mlp():
    ours, _ = _layers(True, k=1)
    ours.eval()
    x = _x()
    with torch.no_grad():
        ours.use_residual = False
        moe_only = ours(x)[0]
        ours.use_residual = True
        nn.init.zeros_(ours.coefficient.weight)
        outputs = {}
        for bias in ((30.0, -30.0), (0.0, 0.0), (-30.0, 30.0)):
            ours.coefficient.bias.copy_(torch.tensor(bias))
            outputs[bias] = ours(x)[0]
    torch.testing.assert_close(outputs[(30.0, -30.0)], moe_only)
    torch.testing.assert_close(outputs[(-30.0, 30.0)], ours.mlp(x))
    torch.testing.assert_close(outputs[(0.0, 0.0)], (moe_only + ours.mlp(x)) / 2)


def test_training_applies_the_residual_once_to_the_mixed_paths_and_trains_it():
    ours, _ = _layers(True, k=2)
    ours.train()
    x = _x().requires_grad_()
    torch.manual_seed(5)
    out, l_aux, _ = ours(x)
    ours.use_residual = False
    torch.manual_seed(5)  # the same noise draws
    mixed = ours(x)[0]
    ours.use_residual = True
    torch.testing.assert_close(out, residual_mix(ours.mlp, ours.coefficient, x, mixed))
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    (out.square().mean() + 0.01 * l_aux).backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    before = ours.coefficient.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, ours.coefficient.weight)


class _ResidualClassifier(nn.Module):

    def __init__(self, ep_size):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = S2MoE(D, FFN(D, 32), num_experts=E, ep_size=ep_size, k=1, use_residual=True)
        self.out = nn.Linear(D, 4)

    def forward(self, x):
        h = self.inp(x)
        y, l_aux, _ = self.moe(h)
        return self.out(h + y), l_aux


def _residual_checkpoint_worker(rank, world_size, ckpt_dir):
    config = {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "Adam", "params": {"lr": 0.01,
                                                                                           "torch_adam": True}},
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**6}
    torch.manual_seed(0)
    engine, _, _, _ = initialize(_ResidualClassifier(world_size), config)
    initial = engine.module.moe.coefficient.weight.detach().clone()
    for step in range(2):
        x = torch.randn(8, D, generator=torch.Generator().manual_seed(10 * step + rank))
        logits, l_aux = engine(x)
        engine.backward(F.cross_entropy(logits, torch.zeros(8, dtype=torch.long)) + 0.01 * l_aux)
        engine.step()
    engine.save_checkpoint(ckpt_dir, tag="t")
    torch.manual_seed(1)
    fresh, _, _, _ = initialize(_ResidualClassifier(world_size), config)
    fresh.load_checkpoint(ckpt_dir, tag="t")
    saved, loaded = engine.module.state_dict(), fresh.module.state_dict()
    assert set(saved) == set(loaded) and {"moe.coefficient.weight", "moe.mlp.fc1.weight"} <= set(saved)
    for name in saved:
        torch.testing.assert_close(loaded[name], saved[name], rtol=0, atol=0, msg=name)
    return not torch.equal(initial, saved["moe.coefficient.weight"])


def test_a_residual_layer_trains_checkpoints_and_reloads_with_deepspeeds_engine(tmp_path):
    assert all(run_distributed(_residual_checkpoint_worker, world_size=1, args=(str(tmp_path),)))
    # As DeepSpeed's: the residual MLP and coefficient are dense weights, kept out of the expert files.
    expert_files = [f for f in os.listdir(tmp_path / "t") if f.startswith("layer_0_expert_")]
    assert len(expert_files) == E
    for name in expert_files:
        keys = torch.load(tmp_path / "t" / name, weights_only=True)
        assert not any("mlp" in k or "coefficient" in k for k in keys), keys


def test_the_runner_of_deepspeeds_tests_swaps_s2moe_in_where_they_import_moe():
    from deepspeed.moe import layer

    from bench import deepspeed_moe_tests as runner
    original, init = layer.MoE, layer.MoE.__init__
    try:
        runner._swap_moe(layer, S2MoE)
        from deepspeed.moe.layer import MoE as swapped
        assert swapped is S2MoE
        # DeepSpeed's __init__ calls super(MoE, self) by its module's name: both still build.
        assert S2MoE(D, FFN(D, 32), num_experts=E, use_residual=True).use_residual
        assert type(original(D, FFN(D, 32), num_experts=E)) is original
    finally:
        layer.MoE, original.__init__ = original, init


def test_the_runner_runs_fp16_cases_in_bf16_and_flags_only_unexplained_differences():
    from bench import deepspeed_moe_tests as runner
    config = {"train_batch_size": 8, "fp16": {"enabled": True, "initial_scale_power": 8}}
    assert runner._bf16_config(config) == {"train_batch_size": 8, "bf16": {"enabled": True}}
    assert runner._bf16_config({"fp16": {"enabled": False}}) == {"fp16": {"enabled": False}}
    explained = next(iter(runner.EXPECTED)) + "test[0]"
    failed = {"outcome": "failed", "message": "AssertionError"}
    rows = runner.compare({"deepspeed": {"a::t": {"outcome": "passed", "message": ""},
                                         explained: {"outcome": "passed", "message": ""}},
                           "s2moe": {"a::t": failed, explained: failed}})
    assert [(r["test"], r["unexpected"], bool(r["reason"])) for r in rows] == [("a::t", True, False),
                                                                              (explained, False, True)]
