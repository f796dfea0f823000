"""The command lines: one flag per config field (--SECTION.KEY) with its docstring as the help,
grouped by section, and docs/cli.md kept equal to what the scripts print."""

import os
import subprocess
import sys
from dataclasses import fields

import pytest

from s2moe_ds.cli import NESTED, field_docs, pretrain_sections, reference_markdown
from s2moe_ds.data import DataConfig
from s2moe_ds.eval.evaluate import EvalConfig
from s2moe_ds.models import ModelConfig
from s2moe_ds.moe import MoEConfig, S2MoEConfig, TopKRouterConfig
from s2moe_ds.parallel import ParallelConfig
from s2moe_ds.train import ExperimentConfig, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("cls", [ModelConfig, MoEConfig, S2MoEConfig, TopKRouterConfig, ParallelConfig, DataConfig,
                                 TrainConfig, EvalConfig, ExperimentConfig])
def test_every_config_field_is_documented(cls):
    docs = field_docs(cls)
    missing = [f.name for f in fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


def test_help_shows_each_fields_docstring_grouped_by_config():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--help"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, COLUMNS="200"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for title in ("model:", "moe: the feed-forward blocks:", "parallel: the parallel layout:", "data:",
                  "s2moe: settings of block 's2moe' (with --moe.block s2moe):", "train: the training loop:",
                  "topk: settings of router 'topk' (with --moe.router topk):"):
        assert "\n" + title + "\n" in proc.stdout, title
    sections, words = {s.cls: s for s in pretrain_sections()}, set(proc.stdout.replace(",", " ").split())
    for cls in (ModelConfig, MoEConfig, S2MoEConfig, TrainConfig):
        for f in fields(cls):
            if f.name not in NESTED and f.name != "vocab_size":
                assert sections[cls].flag(f.name) in words, f.name
    assert "--moe.k INT" in proc.stdout and "--parallel.ep-size INT" in proc.stdout
    assert field_docs(S2MoEConfig)["noise_scale"] in proc.stdout
    assert "(default: 4)" in proc.stdout  # --moe.num-experts: the tiny preset's value, not the dataclass's 16


def test_docs_cli_reference_is_what_the_scripts_print():
    with open(os.path.join(ROOT, "docs", "cli.md")) as f:
        assert f.read() == reference_markdown(), "docs/cli.md is stale: python -m s2moe_ds.cli docs/cli.md"
