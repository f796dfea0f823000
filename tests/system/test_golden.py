"""The regression guard: numbers a change that is not meant to change results must leave exact.

For each of dense, SMoE top-2, S2MoE top-2 and S2MoE top-1: 30 training steps on 2 gloo ranks
(ep_size 2, ZeRO-2, gradient accumulation 2, clipping, dropout) from a fixed seed on a slice of real
text (tests/data/golden_corpus.txt), then the checkpoint's validation BPC with one and with two
experts per token through launch/evaluate.py. Every per-step loss of both ranks, the training loop's
own validation and the evaluated BPC must equal tests/data/golden.json to 1e-6.

The file was recorded before the redesign of issue 11 and is the contract for every later change.
When a change is MEANT to change results, re-record it with

    S2MOE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/system/test_golden.py

and say so in the change. The runs pin the CPU kernels to AVX2 (ATen's dispatch and MKL's code
path) so that a CI machine with AVX-512 computes what this one recorded.
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from s2moe_ds.train import TrainConfig, model_preset

from ..harness import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data")
CORPUS = os.path.join(DATA, "golden_corpus.txt")
GOLDEN = os.path.join(DATA, "golden.json")
TOL = 1e-6

VARIANTS = {
    "dense": dict(block="dense"),
    "smoe-top2": dict(block="moe", k=2),
    "s2moe-top2": dict(block="s2moe", k=2),
    "s2moe-top1": dict(block="s2moe", k=1),
}
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 10**6,
}


def _train_worker(rank, world_size, variant, out_dir, cache):
    from s2moe_ds.data import DataConfig
    from s2moe_ds.parallel import ParallelConfig
    from s2moe_ds.train import ExperimentConfig, pretrain
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32, dropout=0.1,
                         moe=dict(num_experts=4, **VARIANTS[variant]))
    train = TrainConfig(out_dir=out_dir, seq_len=32, max_steps=30, warmup_steps=5, eval_interval=30,
                        save_interval=30, log_interval=10, seed=1234)
    experiment = ExperimentConfig(model=model, parallel=ParallelConfig(ep_size=world_size), train=train,
                                  data=DataConfig(dataset="path", path=CORPUS, cache_dir=cache))
    final = pretrain(experiment, DS_CONFIG)
    return {"losses": final["losses"], "train_valid_bpc": final["valid"]["bpc"]}


def _run_variant(variant, tmp_path):
    out = str(tmp_path / variant)
    ranks = run_distributed(_train_worker, 2, (variant, out, str(tmp_path / "cache")), timeout=600)
    eval_dir = tmp_path / f"{variant}-eval"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), "--checkpoint", out,
                           "--splits", "valid", "--eval-k", "1", "2", "--path", CORPUS,
                           "--cache-dir", str(tmp_path / "cache"),
                           "--out-dir", str(eval_dir)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((eval_dir / "eval.json").read_text())
    bpc = {str(r["eval_k"]): r["bpc"] for r in report["results"]}
    return {"losses_per_rank": [r["losses"] for r in ranks], "train_valid_bpc": ranks[0]["train_valid_bpc"],
            "valid_bpc_by_eval_k": bpc}


def _corpus_sha256():
    with open(CORPUS, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _assert_close(got, want, where):
    if isinstance(want, dict):
        assert set(got) == set(want), (where, sorted(got), sorted(want))
        for key in want:
            _assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), (where, len(got), len(want))
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    else:
        assert abs(got - want) <= TOL, f"{where}: {got!r} != golden {want!r} (|diff| {abs(got - want):.3g} > {TOL})"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_results_equal_the_golden_record(variant, tmp_path, monkeypatch):
    for key, value in PINNED_KERNELS.items():
        monkeypatch.setenv(key, value)  # inherited by the spawned ranks and the evaluation
    got = _run_variant(variant, tmp_path)
    if os.environ.get("S2MOE_UPDATE_GOLDEN") == "1":
        record = json.loads(open(GOLDEN).read()) if os.path.isfile(GOLDEN) else {}
        record.setdefault("corpus_sha256", _corpus_sha256())
        record.setdefault("variants", {})[variant] = got
        with open(GOLDEN, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.write("\n")
        return
    assert os.path.isfile(GOLDEN), f"{GOLDEN} is missing; record it with S2MOE_UPDATE_GOLDEN=1 (see the docstring)"
    golden = json.loads(open(GOLDEN).read())
    assert golden["corpus_sha256"] == _corpus_sha256(), f"{CORPUS} is not the text the golden record was made on"
    _assert_close(got, golden["variants"][variant], variant)
