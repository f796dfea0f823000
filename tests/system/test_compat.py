"""Checkpoints written before the redesign (tests/data/pre_redesign, format 1) still work: they
evaluate to what the code that wrote them computed, resume exactly where that code would have
continued, and a checkpoint of an unknown format is refused before compute."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from s2moe_ds.checkpoint import upgrade_meta, upgrade_model_config
from s2moe_ds.config import ConfigError

from ..harness import run_distributed
from .test_golden import DS_CONFIG, PINNED_KERNELS
from .test_pretrain import TEXT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OLD = os.path.join(ROOT, "tests", "data", "pre_redesign")
EXPECTED = json.loads(open(os.path.join(OLD, "expected.json")).read())
VARIANTS = {"s2moe": dict(), "smoe-moe-every-2": dict(block="moe", moe_every=2), "dense": dict(block="dense")}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture
def pinned(monkeypatch):
    for key, value in PINNED_KERNELS.items():  # as the fixtures were recorded
        monkeypatch.setenv(key, value)


def test_format_1_model_configs_read_as_this_version_writes_them():
    meta = json.loads(open(os.path.join(OLD, "s2moe", "checkpoints", "step00000002", "meta.json")).read())
    assert "format_version" not in meta and meta["model_config"]["moe"]["router"] == "s2moe"
    new = upgrade_meta(meta, "here")
    moe = new["model_config"]["moe"]
    assert new["format_version"] == 2 and new["ep_size"] == 2
    assert (moe["block"], moe["router"], moe["block_config"]["noise_scale"]) == ("s2moe", "topk", 1.0)
    assert "ep_size" not in moe and "s2moe" not in moe
    assert moe["router_config"] == {"noisy_gate_policy": None, "use_rts": True, "top2_2nd_expert_sampling": True,
                                    "balance_loss": "deepspeed"}
    assert (new["model_config"]["activation"], new["model_config"]["backbone_config"]) == ("gelu", None)
    # smoe becomes the 'moe' block kind, without the S2MoE settings it used to carry.
    smoe = json.loads(open(os.path.join(OLD, "smoe-moe-every-2", "checkpoints", "step00000002", "meta.json")).read())
    moe = upgrade_model_config(smoe["model_config"], "here")["moe"]
    assert moe["block"] == "moe" and moe["block_config"] is None
    with pytest.raises(ConfigError, match=r"here: its model config names router 'xmoe'"):
        upgrade_model_config({"moe": {"router": "xmoe"}}, "here")
    with pytest.raises(ConfigError, match=r"here: written in checkpoint format 3 by a newer s2moe-ds"):
        upgrade_meta({"format_version": 3}, "here")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_format_1_checkpoints_evaluate_as_before(variant, corpus, tmp_path, pinned):
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), "--checkpoint",
                           os.path.join(OLD, variant), "--splits", "valid", "--eval-k", "1", "2", "--path", corpus,
                           "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {str(r["eval_k"]): r["bpc"] for r in json.loads((out / "eval.json").read_text())["results"]}
    expected = EXPECTED[variant]["valid_bpc_by_eval_k"]
    assert set(got) == set(expected)
    for k, bpc in expected.items():
        assert got[k] == pytest.approx(bpc, abs=1e-6), (variant, k)


def _resume_worker(rank, world_size, variant, out_dir, text, cache):
    from s2moe_ds.data import DataConfig
    from s2moe_ds.parallel import ParallelConfig
    from s2moe_ds.train import ExperimentConfig, TrainConfig, model_preset, pretrain
    v = dict(VARIANTS[variant])
    model = model_preset("tiny", d_model=16, d_inner=32, n_head=2, max_seq_len=16, dropout=0.1,
                         moe_every=v.pop("moe_every", 1), moe=dict(num_experts=4, **v))
    train = TrainConfig(out_dir=out_dir, seq_len=16, max_steps=4, warmup_steps=2, eval_interval=0, save_interval=2,
                        log_interval=1, seed=7, resume=True)
    # The corpus sits elsewhere than when the checkpoint was written: its tokenizer comes along, as
    # the refusal of a mismatched tokenizer advises.
    tokenizer = os.path.join(out_dir, "checkpoints", "step00000002", "tokenizer.json")
    experiment = ExperimentConfig(model=model, parallel=ParallelConfig(ep_size=world_size), train=train,
                                  data=DataConfig(dataset="path", path=text, cache_dir=cache, tokenizer=tokenizer))
    return pretrain(experiment, DS_CONFIG)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_format_1_checkpoints_resume_exactly(variant, corpus, tmp_path, pinned):
    run = tmp_path / "run"
    shutil.copytree(os.path.join(OLD, variant), run)
    results = run_distributed(_resume_worker, 2, (variant, str(run), corpus, str(tmp_path / "cache")), timeout=600)
    for rank, result in enumerate(results):
        assert result["step"] == 4
        got, want = result["losses"], EXPECTED[variant]["steps_3_4_losses_per_rank"][rank]
        assert got == pytest.approx(want, abs=1e-6), (variant, rank)
    meta = json.loads((run / "checkpoints" / "step00000004" / "meta.json").read_text())
    assert meta["format_version"] == 2  # the run goes on in the current format
