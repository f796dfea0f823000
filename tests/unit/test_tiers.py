"""The test tiers hold: every test file sits in one tier's folder, the fast tiers (`make test-fast`)
neither start N processes from the unit tier nor lean on the system tier, and JIT builds are kept
per venv so a warm venv does not rebuild DeepSpeed's CPU Adam."""

import ast
import os
import re
import sys

from ..conftest import TIERS

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)


def _test_files(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("test_") and f.endswith(".py"))


def _imported_modules(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            yield "." * node.level + (node.module or "")


def test_every_test_file_is_in_a_tier_folder():
    assert _test_files(TESTS) == [], "tests/ itself holds test files: move each into tests/<tier>/"
    for tier in TIERS:
        assert _test_files(os.path.join(TESTS, tier)), f"tests/{tier}/ is empty"


def test_the_fast_tiers_do_not_depend_on_the_system_tier():
    for tier in ("unit", "distributed"):
        for name in _test_files(os.path.join(TESTS, tier)):
            leaning = [m for m in _imported_modules(os.path.join(TESTS, tier, name)) if m.startswith("..system")]
            assert not leaning, f"tests/{tier}/{name} imports {leaning}: shared helpers belong in tests/runs.py"


def test_unit_tests_run_in_one_process():
    for name in _test_files(os.path.join(TESTS, "unit")):
        tree = ast.parse(open(os.path.join(TESTS, "unit", name)).read())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert "run_distributed" not in names, f"tests/unit/{name} starts N processes: it belongs in tests/distributed/"


def test_make_test_fast_runs_the_fast_tiers_and_make_test_all():
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    fast = re.search(r"^test-fast:.*\n\t(.*)$", makefile, re.M).group(1)
    assert fast.split()[-2:] == ["tests/unit", "tests/distributed"]
    assert re.search(r"^test:.*\n\t.*pytest tests$", makefile, re.M)


def test_jit_builds_are_kept_in_the_venv():
    # A per-run folder would rebuild DeepSpeed's CPU Adam (a minute on 2 cores) on every run.
    extensions = os.environ["TORCH_EXTENSIONS_DIR"]
    assert os.path.commonpath([extensions, sys.prefix]) == sys.prefix, extensions
