"""S2MoE under deepspeed.initialize on 2 gloo ranks (ep_size 2): ZeRO 0/1/2, fp32 and bf16.

A tiny model trains (its loss falls), saves a checkpoint with DeepSpeed's per-expert files, and a
fresh engine loads it back with equal weights. ZeRO-3 is refused before any process group starts.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2moe_ds.config import ConfigError
from s2moe_ds.moe import FFN, S2MoE
from s2moe_ds.parallel import initialize

from ..harness import run_distributed

D, CLASSES, E = 16, 4, 4


class TinyClassifier(nn.Module):
    """in -> S2MoE -> out: enough to show the engine trains, shards and checkpoints the layer."""

    def __init__(self, ep_size):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = S2MoE(D, FFN(D, 32), num_experts=E, ep_size=ep_size, k=2, eval_k=1)
        self.out = nn.Linear(D, CLASSES)

    def forward(self, x):
        h = self.inp(x)
        y, l_aux, _ = self.moe(h)
        return self.out(h + y), l_aux


def _batch(step, rank, dtype):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(32, D, generator=g)
    # A fixed rule to learn: the class is the argmax of a fixed projection of x.
    labels = (x @ torch.randn(D, CLASSES, generator=torch.Generator().manual_seed(0))).argmax(-1)
    return x.to(dtype), labels


def _ds_config(stage, dtype):
    return {
        "train_micro_batch_size_per_gpu": 32,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**6,
    }


def _train_save_load_worker(rank, world_size, stage, dtype, ckpt_dir):
    torch.manual_seed(0)
    engine, _, _, _ = initialize(TinyClassifier(world_size), _ds_config(stage, dtype))
    losses = []
    for step in range(40):
        x, labels = _batch(step, rank, dtype)
        logits, l_aux = engine(x)
        loss = F.cross_entropy(logits.float(), labels) + 0.01 * l_aux
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.save_checkpoint(ckpt_dir, tag="final")
    saved = {n: p.detach().clone() for n, p in engine.module.state_dict().items()}

    torch.manual_seed(123)  # different initial weights, so the load must do the work
    fresh, _, _, _ = initialize(TinyClassifier(world_size), _ds_config(stage, dtype))
    load_path, _ = fresh.load_checkpoint(ckpt_dir, tag="final")
    assert load_path is not None
    loaded = fresh.module.state_dict()
    assert set(loaded) == set(saved)
    for name, value in saved.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)
    # The restored optimizer continues identically to the original.
    x, labels = _batch(99, rank, dtype)
    for eng in (engine, fresh):
        torch.manual_seed(5)
        logits, l_aux = eng(x)
        eng.backward(F.cross_entropy(logits.float(), labels) + 0.01 * l_aux)
        eng.step()
    for (name, a), b in zip(engine.module.state_dict().items(), fresh.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stage_trains_checkpoints_and_reloads(stage, dtype, tmp_path):
    losses = run_distributed(_train_save_load_worker, world_size=2, args=(stage, dtype, str(tmp_path)))
    for rank_losses in losses:
        first, last = sum(rank_losses[:5]) / 5, sum(rank_losses[-5:]) / 5
        assert last < 0.7 * first, rank_losses
    files = sorted(os.listdir(tmp_path / "final"))
    # One file per global expert (both ranks wrote theirs), named by DeepSpeed's MoE convention.
    expert_files = [f for f in files if f.startswith("layer_0_expert_")]
    assert expert_files == [f"layer_0_expert_{i}_mp_rank_00_model_states.pt" for i in range(E)], files
    expert_state = torch.load(tmp_path / "final" / expert_files[0], weights_only=False)
    assert all("deepspeed_experts.0." in k for k in expert_state), list(expert_state)


def test_zero3_is_refused_before_any_compute():
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage: 3 is not supported.*Use stage 2"):
        initialize(TinyClassifier(1), _ds_config(3, torch.float32))


def test_fp16_on_cpu_and_bad_config_files_are_refused(tmp_path):
    cfg = _ds_config(2, torch.float32)
    cfg["fp16"] = {"enabled": True}
    with pytest.raises(ConfigError, match=r"fp16\.enabled: .*bf16"):
        initialize(TinyClassifier(1), cfg)
    with pytest.raises(ConfigError, match=r"deepspeed_config: file not found: .*nope\.json"):
        initialize(TinyClassifier(1), str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json is not valid JSON"):
        initialize(TinyClassifier(1), str(tmp_path / "bad.json"))
