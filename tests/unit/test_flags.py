"""Sectioned flags (--SECTION.KEY, namespaced destinations) cannot collide, whatever fields a new
router, block kind or backbone brings; the plain spellings of earlier command lines keep their
meaning; and errors name the flag as the user typed it, the fix in the sectioned spelling."""

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from s2moe_ds.cli import (Section, add_sections, eval_config_from_args, evaluate_parser, experiment_from_args,
                          finetune_parser, finetune_sections, given, pretrain_parser, pretrain_sections)
from s2moe_ds.config import ConfigError
from s2moe_ds.moe import BLOCKS, ROUTERS
from s2moe_ds.moe.spec import RouterSpec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class ShadowRouterConfig:
    """A router's settings named like the model's fields."""

    dropout: float = 0.0
    """Named like ModelConfig.dropout."""
    d_model: int = 8
    """Named like ModelConfig.d_model."""
    width: int = 2
    """Also a field of EchoRouterConfig."""
    shadow_dim: int = 4
    """Prefixed with the router's name, as the routers of this repository are."""


@dataclass
class EchoRouterConfig:
    """A second router sharing a field with the first."""

    width: int = 3
    """Also a field of ShadowRouterConfig."""


@dataclass
class KBlockConfig:
    """Settings of block kind 'moe', named like MoEConfig's k: its section is named 'moe' too."""

    k: int = 1
    """Named like MoEConfig.k."""


@pytest.fixture
def shadowing_entries():
    """Routers 'shadow' and 'echo' and settings for block kind 'moe', registered for one test."""
    ROUTERS["shadow"] = RouterSpec(build=lambda *args: None, config=ShadowRouterConfig)
    ROUTERS["echo"] = RouterSpec(build=lambda *args: None, config=EchoRouterConfig)
    moe_block = BLOCKS["moe"]
    BLOCKS["moe"] = dataclasses.replace(moe_block, config=KBlockConfig)
    try:
        yield
    finally:
        del ROUTERS["shadow"], ROUTERS["echo"]
        BLOCKS["moe"] = moe_block


def _experiment(*argv):
    return experiment_from_args(pretrain_parser().parse_args(["--deepspeed_config", "x", *argv]))


def test_router_fields_named_like_model_fields_get_flags_of_their_own(shadowing_entries):
    exp = _experiment("--moe.router", "shadow", "--model.dropout", "0.2", "--shadow.dropout", "0.3",
                      "--model.d-model", "32", "--shadow.d-model", "16", "--shadow.dim", "5")
    assert (exp.model.dropout, exp.model.d_model) == (0.2, 32)
    assert exp.model.moe.router_config == ShadowRouterConfig(dropout=0.3, d_model=16, shadow_dim=5)


def test_a_plain_name_keeps_its_old_meaning_when_a_router_shares_it(shadowing_entries):
    plain = _experiment("--router", "shadow", "--dropout", "0.2", "--d-model", "32", "--shadow-dim", "5")
    assert plain == _experiment("--moe.router", "shadow", "--model.dropout", "0.2", "--model.d-model", "32",
                                "--shadow.dim", "5")
    assert plain.model.moe.router_config.dropout == 0.0


def test_a_section_named_like_another_is_qualified_by_its_kind(shadowing_entries):
    names = [s.name for s in pretrain_sections()]
    assert "block_moe" in names and names.count("moe") == 1
    exp = _experiment("--moe.block", "moe", "--moe.k", "2", "--block-moe.k", "3", "--moe.router", "topk")
    assert (exp.model.moe.k, exp.model.moe.block_config.k) == (2, 3)
    assert _experiment("--block", "moe", "--k", "1").model.moe.k == 1  # --k is still moe.k


def test_a_plain_name_two_routers_share_is_refused_with_both_flags(shadowing_entries, capsys):
    parser = pretrain_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--width", "4"])
    assert e.value.code == 2
    assert "argument --width: several sections have this field; use --shadow.width or --echo.width" in \
        capsys.readouterr().err
    assert _experiment("--moe.router", "echo", "--echo.width", "4").model.moe.router_config.width == 4
    text = parser.format_help()
    assert "--shadow.dropout FLOAT" in text and "--echo.width INT" in text
    assert "--width (--shadow.width or --echo.width)" in " ".join(text.split())


def test_every_plain_spelling_sets_what_its_sectioned_flag_sets():
    """Each field's alias and its sectioned flag fill the same destination with the same value, in
    every script with config flags (a switch's negation too)."""
    for parser in (pretrain_parser(), finetune_parser(), evaluate_parser()):
        sectioned = {a.dest: a for a in parser._actions if any("." in s for s in a.option_strings)}
        aliases = [a for a in parser._actions if a.dest in sectioned and a not in sectioned.values()]
        assert len(aliases) == len(sectioned), parser.prog  # no collision today: every field has one
        for alias in aliases:
            new = sectioned[alias.dest]
            value = [] if alias.nargs == 0 else ["1", "2"] if alias.nargs == "+" else ["3"]
            for old_flag, new_flag in zip(alias.option_strings, new.option_strings):
                assert getattr(parser.parse_args([old_flag, *value]), alias.dest) == \
                    getattr(parser.parse_args([new_flag, *value]), alias.dest), (old_flag, new_flag)


@pytest.mark.parametrize("old,new", [
    ("--router xmoe --xmoe-dim 8 --no-xmoe-learn-temperature --k 1 --eval-k 1 --ep-size 2",
     "--moe.router xmoe --xmoe.dim 8 --xmoe.no-learn-temperature --moe.k 1 --moe.eval-k 1 --parallel.ep-size 2"),
    ("--noise-scale 0.5 --no-detach-noise-stats --uncertainty-coef 0 --num-experts 8 --no-drop-tokens",
     "--s2moe.noise-scale 0.5 --s2moe.no-detach-noise-stats --s2moe.uncertainty-coef 0 --moe.num-experts 8 "
     "--moe.no-drop-tokens"),
    ("--backbone txl --mem-len 16 --pre-norm --d-model 32 --dropout 0.1 --activation relu",
     "--model.backbone txl --txl.mem-len 16 --txl.pre-norm --model.d-model 32 --model.dropout 0.1 "
     "--model.activation relu"),
    ("--router stablemoe --stablemoe-stage1-steps 10 --lr 1e-3 --max-steps 20 --split 0.8 0.1 0.1 --resume",
     "--moe.router stablemoe --stablemoe.stage1-steps 10 --train.lr 1e-3 --train.max-steps 20 "
     "--data.split 0.8 0.1 0.1 --train.resume"),
    ("--block moe --router smoe_dropout --smoe-dropout-k-start 1 --smoe-dropout-steps 5",
     "--moe.block moe --moe.router smoe_dropout --smoe-dropout.k-start 1 --smoe-dropout.steps 5"),
])
def test_old_and_new_spellings_give_identical_experiments(old, new):
    assert _experiment(*old.split()) == _experiment(*new.split())
    assert _experiment(*old.split()) != _experiment()


def test_finetune_and_evaluate_spellings_agree():
    parser = finetune_parser()
    old = parser.parse_args("--pretrained runs/x --dataset sst2 --eval-k 1 2 --ep-size 2 --lr 1e-3 "
                            "--dropout 0.1".split())
    new = parser.parse_args("--finetune.pretrained runs/x --data.dataset sst2 --finetune.eval-k 1 2 "
                            "--parallel.ep-size 2 --train.lr 1e-3 --finetune.dropout 0.1".split())
    assert [given(old, s) for s in finetune_sections()] == [given(new, s) for s in finetune_sections()]
    assert given(new, finetune_sections()[0])["eval_k"] == (1, 2)
    parser = evaluate_parser()
    assert eval_config_from_args(parser.parse_args("--checkpoint runs/x --eval-k 1 --splits valid --dataset path "
                                                   "--path a.txt".split())) == \
        eval_config_from_args(parser.parse_args("--eval.checkpoint runs/x --eval.k 1 --eval.splits valid "
                                                "--data.dataset path --data.path a.txt".split()))


def test_a_setting_of_an_entry_the_run_does_not_use_is_named_as_typed_with_the_sectioned_fix():
    with pytest.raises(ConfigError, match=r"^--s2moe\.noise-scale: is a setting of block 's2moe', but this run's "
                                          r"moe\.block is 'moe'; drop it or pass --moe\.block s2moe$"):
        _experiment("--moe.block", "moe", "--s2moe.noise-scale", "0.5")
    with pytest.raises(ConfigError, match=r"^--xmoe-dim: is a setting of router 'xmoe', but this run's moe\.router "
                                          r"is 'topk'; drop it or pass --moe\.router xmoe$"):
        _experiment("--xmoe-dim", "8")
    with pytest.raises(ConfigError, match=r"^--txl\.no-pre-norm: is a setting of backbone 'txl', .* pass "
                                          r"--model\.backbone txl$"):
        _experiment("--txl.no-pre-norm")


def test_a_prefix_is_dropped_only_where_it_leaves_a_distinct_key():
    @dataclass
    class Odd:
        odd: int = 0
        odd_: int = 0
        odd_x: int = 0
        x: int = 0
    section = Section("odd", Odd)
    assert [section.flag(n) for n in ("odd", "odd_", "odd_x", "x")] == ["--odd.odd", "--odd.odd-", "--odd.odd-x",
                                                                         "--odd.x"]


@dataclass
class Tricky:
    """Fields whose plain or negated flags meet others'."""

    preset: str = ""
    """Named like the script's own --preset."""
    fused: bool = False
    """Also a field of Other."""
    no_fused: int = 0
    """Its flag is fused's negation's spelling."""


@dataclass
class Other:
    """A second core section."""

    fused: bool = True
    """Also a field of Tricky."""


def test_flags_that_would_meet_are_given_up_never_a_crash(capsys):
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="p")
    add_sections(parser, [Section("t", Tricky), Section("o", Other)])
    ns = parser.parse_args("--preset q --t.preset r --t.fused --t.no-fused 3 --o.no-fused".split())
    assert (ns.preset, getattr(ns, "t.preset"), getattr(ns, "t.fused"), getattr(ns, "t.no_fused"),
            getattr(ns, "o.fused")) == ("q", "r", True, 3, False)
    for shared in ("--fused", "--no-fused"):  # two core sections: no alias, and --no-fused is not no_fused's
        with pytest.raises(SystemExit):
            parser.parse_args([shared])
        assert "use --t.fused or --o.fused" in capsys.readouterr().err


def test_help_is_grouped_by_section_and_hides_the_aliases():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--help"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, COLUMNS="100"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    headings = [line[:-1] for line in proc.stdout.splitlines() if line and not line[0].isspace() and
                line.endswith(":")]
    assert [h.split(":")[0] for h in headings[1:]] == \
        [s.name.replace("_", "-") for s in pretrain_sections()] + ["DeepSpeed"]
    assert "s2moe: settings of block 's2moe' (with --moe.block s2moe)" in headings
    assert "--s2moe.noise-scale FLOAT" in proc.stdout and "--noise-scale" not in proc.stdout.split("options:")[1]


def test_help_of_one_section_prints_that_group_only(capsys):
    with pytest.raises(SystemExit) as e:
        pretrain_parser(100).parse_args(["--help", "xmoe"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("xmoe: settings of router 'xmoe' (with --moe.router xmoe):")
    assert "--xmoe.dim INT" in out and "--moe.k" not in out and len(out.splitlines()) < 30
    with pytest.raises(SystemExit) as e:
        pretrain_parser(100).parse_args(["--help", "xmo"])
    assert e.value.code == 2 and "--help: no section 'xmo'; the sections: options, model, txl, moe," in \
        capsys.readouterr().err
