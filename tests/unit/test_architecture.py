"""The house's rules, checked on the code itself: imports run one way between packages, DeepSpeed's
private names are reached from one module (library, launch scripts and benchmarks), block kinds are
switched on inside moe/ only, and the launch scripts are thin (no sys.path tricks)."""

import ast
import io
import os
import re
import tokenize
from collections import defaultdict

import pytest

from s2moe_ds.parallel import deepspeed_internals

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "s2moe_ds")
INTERNALS = os.path.join(PACKAGE, "parallel", "deepspeed_internals.py")


def _library_files():
    for folder, _, names in os.walk(PACKAGE):
        for name in sorted(names):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _subpackage(path: str) -> str:
    """'moe' for s2moe_ds/moe/blocks/s2moe.py, 'cli' for s2moe_ds/cli.py."""
    return os.path.relpath(path, PACKAGE).split(os.sep)[0].removesuffix(".py")


def _imported_subpackages(path: str):
    """The s2moe_ds subpackages a file imports (relative or absolute), at any depth of the file."""
    tree = ast.parse(open(path).read())
    here = os.path.relpath(os.path.dirname(path), PACKAGE).split(os.sep)
    here = [] if here == ["."] else here
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts[0]] if parts else [a.name for a in node.names]
            elif node.module and node.module.startswith("s2moe_ds."):
                names = [node.module.split(".")[1]]
            else:
                continue
            yield from names
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("s2moe_ds."):
                    yield alias.name.split(".")[1]


def test_packages_import_one_way():
    graph = defaultdict(set)
    for path in _library_files():
        src = _subpackage(path)
        for dst in _imported_subpackages(path):
            if dst != src and dst != "__init__":
                graph[src].add(dst)
    # A cycle is a path back to where it started.
    def reach(start):
        seen, stack = set(), [start]
        while stack:
            for nxt in graph[stack.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen
    cycles = sorted(p for p in list(graph) if p in reach(p))
    assert not cycles, f"packages in an import cycle: {cycles}; edges: {dict(graph)}"
    # The layering the docs describe.
    assert "train" not in reach("eval") and "train" not in reach("checkpoint")
    assert not ({"train", "eval", "checkpoint", "data"} & reach("models"))
    assert not ({"models", "train", "eval", "checkpoint", "data"} & reach("moe"))
    assert not ({"moe", "models", "train", "eval", "checkpoint"} & reach("parallel"))
    # The Hugging Face export needs an optional extra: no part of training may import it.
    assert not [p for p in graph if "hf" in graph[p]], dict(graph)


def _code_without_strings(path: str) -> str:
    """The file's code with comments and string literals (docstrings included) blanked out."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(open(path).read()).readline):
        out.append("" if tok.type in (tokenize.COMMENT, tokenize.STRING) else tok.string)
    return " ".join(out)


PRIVATE = [r"\bdeepspeed_moe\b", r"\bdeepspeed_experts\b", r"\.\s*wg\b", r"\bgroups\s*\.\s*_", r"\bbuild_shm_op\b",
           r"\bsharded_moe\b", r"\bexp_counts\b", r"\bl_aux\s*,\s*C\b", r"deepspeed\s*\.\s*utils\b"]


def _python_files(*folders):
    for folder in folders:
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                yield os.path.join(ROOT, folder, name)


def test_deepspeed_private_names_are_reached_from_one_module():
    offenders = []
    for path in [*_library_files(), *_python_files("launch", "bench")]:
        if path == INTERNALS:
            continue
        code = _code_without_strings(path)
        offenders += [(os.path.relpath(path, ROOT), p) for p in PRIVATE if re.search(p, code)]
    assert not offenders, offenders
    # ... and that module does use them (the patterns would catch a real use).
    assert all(re.search(p, _code_without_strings(INTERNALS)) for p in PRIVATE[:6])


@pytest.mark.parametrize("version, ok", [("0.19.8", True), ("0.19.12+cpu", True), ("0.19.7", False),
                                         ("0.20.0", False), ("1.0.0", False)])
def test_the_deepspeed_version_is_checked_with_the_supported_range(version, ok):
    if ok:
        deepspeed_internals.check_version(version)
        return
    with pytest.raises(ImportError, match=r"supports deepspeed >=0\.19\.8,<0\.20, found " + re.escape(version)):
        deepspeed_internals.check_version(version)


BLOCK_CLASSES = {"S2MoE", "MoEBlock", "MoE", "ExpertBlock", "FFN", "TopKRouter"}
BLOCK_NAMES = {"s2moe", "smoe", "moe", "dense", "topk"}


def test_block_kinds_and_routers_are_switched_on_inside_moe_only():
    offenders = []
    for path in _library_files():
        if os.path.relpath(path, PACKAGE).startswith("moe" + os.sep):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                if names & BLOCK_CLASSES:
                    offenders.append((os.path.relpath(path, ROOT), node.lineno, "isinstance"))
            if isinstance(node, ast.Compare) and all(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                consts = {c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)}
                if consts & BLOCK_NAMES:
                    offenders.append((os.path.relpath(path, ROOT), node.lineno, "name"))
    assert not offenders, offenders


def test_launch_scripts_are_thin():
    for name in sorted(os.listdir(os.path.join(ROOT, "launch"))):
        if name.endswith(".py"):
            code = open(os.path.join(ROOT, "launch", name)).read()
            assert "sys.path" not in code, name
            assert len(code.splitlines()) < 60, name


# What reads or edits DeepSpeed's gating tuple (l_aux, capacity, E, indices, locations, gates,
# exp_counts) by position, or asks a gate for it: only the adapter in deepspeed_internals may.
GATING_TUPLE = [r"\bSPARSE_GATES\b", r"\bsparse_gates\b", r"\bwith_gates\b", r"\broute_indices\b",
                r"\bwith_balance_loss\b", r"\btop1gating\b", r"\btop2gating\b", r"\btopkgating\b",
                r"\bsparse_routes\s*=\s*True\b"]


def test_nothing_outside_the_adapter_indexes_deepspeeds_gating_tuple():
    offenders = []
    for path in [*_library_files(), *_python_files("launch", "bench")]:
        if path == INTERNALS:
            continue
        code = _code_without_strings(path)
        offenders += [(os.path.relpath(path, ROOT), p) for p in GATING_TUPLE if re.search(p, code)]
        # A subscript or tuple unpacking of what a deepspeed_internals call returns.
        for node in ast.walk(ast.parse(open(path).read())):
            value = node.value if isinstance(node, (ast.Subscript, ast.Assign)) else None
            if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
                    and getattr(value.func.value, "id", None) == "ds"
                    and (isinstance(node, ast.Subscript) or isinstance(node.targets[0], ast.Tuple))):
                offenders.append((os.path.relpath(path, ROOT), node.lineno, ast.unparse(node)[:60]))
    assert not offenders, offenders
