"""launch/evaluate.py and its library: eval_k 1 and 2 on a checkpoint trained on 2 processes,
evaluated on one; determinism; the analysis files; errors before any compute."""

import json
import os
import subprocess
import sys

import pytest

from s2moe_ds.checkpoint import load_model
from s2moe_ds.config import ConfigError
from s2moe_ds.eval.evaluate import EvalConfig, evaluate_checkpoint
from s2moe_ds.eval.flops import flops_per_token, inference_cost_ratio

from ..harness import run_distributed
from .test_pretrain import TEXT, _pretrain_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step S2MoE run on 2 processes (ep_size 2, ZeRO-2); returns (run dir, training's final metrics)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    text = tmp / "corpus.txt"
    text.write_text(TEXT)
    out = str(tmp / "run")
    results = run_distributed(_pretrain_worker, 2, (str(text), out, str(tmp / "cache"), dict(max_steps=6)))
    return out, results[0]


def _corpus(run):
    """The corpus flag: evaluate never opens a path the checkpoint records outside its run folder."""
    root = os.path.dirname(run)
    return {"path": os.path.join(root, "corpus.txt"), "cache_dir": os.path.join(root, "cache")}


def _deterministic(report):
    return [{k: v for k, v in row.items() if k not in ("seconds", "tokens_per_s")} for row in report["results"]]


def test_eval_k_1_and_2_on_one_process_from_a_two_process_run(trained, tmp_path):
    run, final = trained
    cfg = EvalConfig(checkpoint=run, out_dir=str(tmp_path / "a"), data_overrides=_corpus(run))
    report = evaluate_checkpoint(cfg, log=lambda s: None)
    assert report["trained_with"] == {"world_size": 2, "ep_size": 2}
    rows = {(r["split"], r["eval_k"]): r for r in report["results"]}
    assert set(rows) == {("valid", 1), ("valid", 2), ("test", 1), ("test", 2)}
    # The model trained with k = 2: its eval_k 2 pass is the validation the training loop ran.
    assert rows[("valid", 2)]["bpc"] == pytest.approx(final["valid"]["bpc"], abs=1e-5)
    assert rows[("valid", 1)]["bpc"] != rows[("valid", 2)]["bpc"]
    model, _ = load_model(run)
    expected_ratio = inference_cost_ratio(model.cfg, report["seq_len"], 1, 2)
    assert rows[("valid", 1)]["flops_vs_largest_k"] == pytest.approx(expected_ratio)
    assert expected_ratio < 1.0
    assert rows[("valid", 1)]["flops_per_token"] == pytest.approx(flops_per_token(model.cfg, report["seq_len"], 1)["total"])
    assert all(r["tokens_per_s"] > 0 for r in report["results"])
    with open(tmp_path / "a" / "eval.json") as f:
        assert json.load(f)["results"][0]["bpc"] == report["results"][0]["bpc"]
    # Identical numbers from a second run (timings aside).
    again = evaluate_checkpoint(EvalConfig(checkpoint=run, out_dir=str(tmp_path / "b"), data_overrides=_corpus(run)),
                                log=lambda s: None)
    assert _deterministic(again) == _deterministic(report)
    # Batch size changes speed only: eval never drops tokens.
    other = evaluate_checkpoint(EvalConfig(checkpoint=run, eval_k=(1, ), splits=("valid", ), batch_size=3,
                                           out_dir=str(tmp_path / "c"), data_overrides=_corpus(run)),
                                log=lambda s: None)
    assert other["results"][0]["bpc"] == pytest.approx(rows[("valid", 1)]["bpc"], abs=1e-6)


def test_one_model_switched_between_eval_k_gives_what_a_model_per_eval_k_gives(trained, tmp_path):
    """evaluate switches eval_k on one model in place; the numbers are those of a model built with
    each eval_k (what evaluate did before), bit for bit, and the switch leaves no trace."""
    from s2moe_ds.checkpoint import resolve_checkpoint
    from s2moe_ds.data import DataConfig, prepare_corpus
    from s2moe_ds.eval import evaluate_lm
    from s2moe_ds.eval.evaluate import data_settings
    run, _ = trained
    report = evaluate_checkpoint(EvalConfig(checkpoint=run, eval_k=(2, 1), splits=("valid", ), out_dir=str(tmp_path),
                                            data_overrides=_corpus(run)), log=lambda s: None)
    _, client = load_model(run)
    corpus = prepare_corpus(DataConfig(**data_settings(client["run"]["data"], _corpus(run), resolve_checkpoint(run))))
    for row in report["results"]:
        model, _ = load_model(run, eval_k=row["eval_k"])
        alone = evaluate_lm(model, model.cfg, corpus.splits["valid"], report["seq_len"], 16, 0, 1, "cpu",
                            corpus.units["valid"], corpus.metric)
        assert {k: row[k] for k in alone} == alone, row["eval_k"]
    assert report["results"][0]["bpc"] != report["results"][1]["bpc"]


def test_flops_count_attention_and_active_experts():
    from s2moe_ds.train import model_preset
    cfg = model_preset("paper-small", vocab_size=256)
    one, two = flops_per_token(cfg, 512, 1), flops_per_token(cfg, 512, 2)
    d, f = 256, 512
    assert two["experts"] - one["experts"] == pytest.approx(4 * 4 * d * f)  # 4 layers, one more expert each
    assert one["attention"] == pytest.approx(4 * (8 * d * d + 4 * (513 / 2) * d))
    assert 0.70 < inference_cost_ratio(cfg, 512) < 0.75  # the paper's "about 28% less"
    train = flops_per_token(cfg, 512, training=True)
    assert train["experts"] == pytest.approx(3 * 2 * two["experts"])  # two paths, forward + backward


def test_cli_with_analysis_writes_report_plots_and_tensorboard(trained, tmp_path):
    run, _ = trained
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), "--checkpoint", run,
                           "--eval-k", "1", "--splits", "valid", "--analysis", "--analysis-tokens", "256",
                           "--out-dir", str(out), "--path", _corpus(run)["path"],
                           "--cache-dir", _corpus(run)["cache_dir"]],
                          capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| valid | 1 |" in proc.stdout
    analysis = json.loads((out / "analysis.json").read_text())
    assert len(analysis["layers"]) == 2 and analysis["eval_k"] == 1
    layer = analysis["layers"][0]
    assert layer["k"] == 1  # the analysed eval_k, not the checkpoint's 2
    for key in ("utilisation_entropy", "router_entropy_mean", "output_similarity", "weight_similarity",
                "effective_rank_per_expert", "mix_gate", "routing_heatmap"):
        assert key in layer
    assert layer["sample_tokens"] == 256
    for name in analysis["plots"]:
        assert (out / name).stat().st_size > 1000
    assert {"plots/layer0_routing.png", "plots/layer0_expert_similarity.png", "plots/layer0_mix_gate.png"} <= set(analysis["plots"])
    events = os.listdir(out / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)
    from s2moe_ds.train.monitor import read_scalars
    assert read_scalars(str(out / "tensorboard"), "analysis/layer0/utilisation_entropy")


@pytest.mark.parametrize("argv, field", [
    (["--eval-k", "0"], "eval.eval_k"),
    (["--splits", "dev"], "eval.splits"),
    (["--seq-len", "999"], "eval.seq_len"),
    (["--eval-k", "1", "5"], "eval.eval_k: 5 exceeds the checkpoint's 4 experts per layer"),
])
def test_bad_flags_are_named(trained, argv, field):
    run, _ = trained
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), "--checkpoint", run, *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and field in proc.stderr, proc.stderr[-2000:]


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="--checkpoint"):
        evaluate_checkpoint(EvalConfig(checkpoint=str(tmp_path / "nothing")))
