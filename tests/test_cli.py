"""The command lines: one flag per config field with its docstring as the help, grouped by config,
and docs/cli.md kept equal to what the scripts print."""

import os
import subprocess
import sys
from dataclasses import fields

import pytest

from s2moe_ds.cli import NESTED, field_docs, reference_markdown
from s2moe_ds.data import DataConfig
from s2moe_ds.eval.evaluate import EvalConfig
from s2moe_ds.models import ModelConfig
from s2moe_ds.moe import MoEConfig, S2MoEConfig, TopKRouterConfig
from s2moe_ds.parallel import ParallelConfig
from s2moe_ds.train import ExperimentConfig, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    for title in ("model:", "moe: the feed-forward blocks:", "block 's2moe' (with --block s2moe):",
                  "router 'topk' (with --router topk):", "parallel layout:", "data:", "training:"):
        assert title in proc.stdout, title
    for cls in (ModelConfig, MoEConfig, S2MoEConfig, TrainConfig):
        for f in fields(cls):
            if f.name not in NESTED and f.name != "vocab_size":
                assert "--" + f.name.replace("_", "-") in proc.stdout, f.name
    assert field_docs(S2MoEConfig)["noise_scale"] in proc.stdout
    assert "(default: 4)" in proc.stdout  # --num-experts: the tiny preset's value, not the dataclass's 16


def test_docs_cli_reference_is_what_the_scripts_print():
    with open(os.path.join(ROOT, "docs", "cli.md")) as f:
        assert f.read() == reference_markdown(), "docs/cli.md is stale: python -m s2moe_ds.cli docs/cli.md"
