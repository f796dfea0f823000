"""The comparison harness: variant planning, its errors, and launch/compare.py end to end."""

import json
import os
import subprocess
import sys

import pytest

from s2moe_ds.config import ConfigError
from s2moe_ds.experiments.compare import plan_variants

from .test_pretrain import TEXT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_default_variants_and_ablations_become_flags():
    variants = plan_variants(["smoe", "s2moe", "s2moe-top1"], ["uncertainty_coef=0,0.5", "noise_stats=global"])
    names = [v.name for v in variants]
    assert names == ["smoe", "s2moe", "s2moe-top1", "s2moe uncertainty_coef=0", "s2moe uncertainty_coef=0.5",
                     "s2moe noise_stats=global"]
    flags = {v.name: v.flags() for v in variants}
    assert flags["smoe"] == ["--block", "moe", "--k", "2"]
    assert flags["s2moe-top1"] == ["--block", "s2moe", "--k", "1"]
    assert flags["s2moe uncertainty_coef=0"] == ["--block", "s2moe", "--k", "2", "--uncertainty-coef", "0"]
    assert variants[4].moe_dict() == {"k": 2, "block": "s2moe", "block_config": {"uncertainty_coef": 0.5}}
    with_set = plan_variants(["smoe"], sets=["num_experts=8"])
    assert with_set[0].flags() == ["--block", "moe", "--k", "2", "--num-experts", "8"]
    # Every baseline router, plain and under S2MoE; a router's own setting reaches its variants only.
    routers = plan_variants(["xmoe", "s2moe-xmoe", "s2moe-stablemoe", "smoe-dropout"], sets=["xmoe_dim=8"])
    assert [v.flags() for v in routers] == [["--block", "moe", "--k", "2", "--router", "xmoe", "--xmoe-dim", "8"],
                                            ["--block", "s2moe", "--k", "2", "--router", "xmoe", "--xmoe-dim", "8"],
                                            ["--block", "s2moe", "--k", "2", "--router", "stablemoe"],
                                            ["--block", "moe", "--k", "2", "--router", "smoe_dropout"]]
    assert routers[1].moe_dict() == {"block": "s2moe", "k": 2, "router": "xmoe", "router_config": {"xmoe_dim": 8}}
    # A block kind's own setting goes to the variants of that kind only; the router's to every routed one.
    mixed = plan_variants(["smoe", "s2moe", "dense"], sets=["noise_stats=global", "use_rts=false"])
    assert [v.flags() for v in mixed] == [["--block", "moe", "--k", "2", "--no-use-rts"],
                                          ["--block", "s2moe", "--k", "2", "--noise-stats", "global", "--no-use-rts"],
                                          ["--block", "dense", "--no-use-rts"]]


@pytest.mark.parametrize("kw, match", [
    (dict(names=["moe"]), "--variants: unknown variant 'moe'"),
    (dict(names=[], ablations=["bogus=1"]), "--ablate: unknown field 'bogus'"),
    (dict(names=[], ablations=["noise_stats=everywhere"]), "s2moe.noise_stats"),
    (dict(names=[], ablations=["uncertainty_coef"]), "FIELD=VALUE"),
    (dict(names=["s2moe"], ablations=["k=3"], sets=["num_experts=2"]), "k"),
    (dict(names=["smoe", "smoe"]), "listed twice"),
    (dict(names=["smoe"], sets=["noise_scale=0.5"]), "--set: 'noise_scale' is a setting of none of the variants"),
    (dict(names=[], ablations=["noise_scale=0.5"], ablate_base="smoe"), "not a setting of variant 'smoe'"),
])
def test_bad_plans_are_refused_with_the_field_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        plan_variants(kw["names"], kw.get("ablations", ()), kw.get("ablate_base", "s2moe"), sets=kw.get("sets", ()))


def _compare(tmp_path, out):
    text = tmp_path / "corpus.txt"
    if not text.exists():
        text.write_text(TEXT)
    cmd = [sys.executable, os.path.join(ROOT, "launch", "compare.py"), "--path", str(text), "--variants", "smoe",
           "s2moe-top1", "--seeds", "7", "--max-steps", "4", "--evals", "2", "--nproc", "2", "--out", str(out),
           # passed through to launch/pretrain.py: a smaller model and a cache inside the test folder
           "--d-model", "32", "--d-inner", "64", "--max-seq-len", "32", "--seq-len", "32",
           "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def test_harness_end_to_end_reproduces_its_table(tmp_path):
    first = _compare(tmp_path, tmp_path / "a")
    md = (tmp_path / "a" / "results.md").read_text()
    assert "| smoe | 1 |" in md and "| s2moe-top1 | 1 |" in md
    report = json.loads((tmp_path / "a" / "results.json").read_text())
    run = report["runs"]["s2moe-top1"][0]
    assert {(r["split"], r["eval_k"]) for r in run["eval"]["results"]} == {("valid", 1), ("valid", 2), ("test", 1),
                                                                            ("test", 2)}
    assert [s for s, _ in run["valid_curve"]] == [2, 4]
    assert 0 < run["final_mix_gate_mean"] < 1 and run["train_step_ms_median"] > 0
    assert report["runs"]["smoe"][0]["final_mix_gate_mean"] is None  # no mixing gate in SMoE
    assert "| variant | train ms/step (median) |" in md
    assert (tmp_path / "a" / "results_curves.png").stat().st_size > 1000
    # A second invocation reuses the finished runs ...
    again = _compare(tmp_path, tmp_path / "a")
    assert again.stdout.count("reusing") == 2 and "$ " not in again.stdout
    # ... and a fresh folder retrains from scratch to the same table.
    _compare(tmp_path, tmp_path / "b")
    def table(path):
        return [line for line in path.read_text().split("Per seed:")[0].splitlines() if line.startswith("|")]
    assert len(table(tmp_path / "a" / "results.md")) == 4
    assert table(tmp_path / "b" / "results.md") == table(tmp_path / "a" / "results.md")
    assert "Code: " in md
    del first
    # Another budget on the same --out: the finished runs are refused with the difference, not deleted.
    before = sorted(os.listdir(tmp_path / "a" / "runs" / "smoe" / "seed7"))
    text = tmp_path / "corpus.txt"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "compare.py"), "--path", str(text),
                           "--variants", "smoe", "--seeds", "7", "--max-steps", "6", "--evals", "2", "--nproc", "2",
                           "--out", str(tmp_path / "a"), "--d-model", "32", "--d-inner", "64", "--max-seq-len", "32",
                           "--seq-len", "32", "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "$ " not in proc.stdout, proc.stdout + proc.stderr
    assert f"error: --out: run folder {tmp_path / 'a' / 'runs' / 'smoe' / 'seed7'} holds a run of another command (" \
        in proc.stderr and "--max-steps: recorded 4, now 6" in proc.stderr, proc.stderr
    assert "pass another --out, or remove that folder yourself" in proc.stderr
    assert sorted(os.listdir(tmp_path / "a" / "runs" / "smoe" / "seed7")) == before
