"""What `python -m s2moe_ds.hf.lm_eval` lets lm_eval read as tasks: a task folder holding no Python,
and YAML of plain data only. lm_eval's YAML loader runs Python from a task file (`!function mod.fn`
imports mod.py beside it, or any installed module; its loader also builds Python objects from
`!!python/...` tags), and `include:` pulls in YAML from any path. A task folder that came with a
received export could so run its author's code, or read any file it names: --include_path only a
folder you wrote."""

import os
from typing import Iterable, List

import yaml

from ...config import ConfigError

# The tags plain YAML data resolves to; anything else is a constructor lm_eval's loader may run.
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge",
                                                   "timestamp", "binary")}


def check_task_folder(folder: str, flag: str = "--include_path") -> None:
    """ConfigError (naming `flag`, the file and the fix) unless every file under `folder` is
    plain: no .py file, no link, and YAML with no tags beyond plain data and no include outside."""
    if os.path.islink(folder):
        _refuse(flag, folder, "is a symbolic link")
    if os.path.isfile(folder):
        _check_yaml(folder, os.path.dirname(os.path.realpath(folder)), flag)
        return
    root = os.path.realpath(folder)
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(parent, name)
            if os.path.islink(path):
                _refuse(flag, path, "is a symbolic link (lm_eval would follow it out of the folder)")
            if name.endswith((".py", ".pyc", ".so")):
                _refuse(flag, path, "is Python, which a task's !function runs")
        for name in files:
            if name.endswith((".yaml", ".yml")):
                _check_yaml(os.path.join(parent, name), root, flag)


def check_task_sources(include_path, tasks: Iterable[str] = ()) -> None:
    """Every folder of --include_path (one path, or several joined by os.pathsep) and every --tasks
    entry that names a file or folder, checked with check_task_folder."""
    for path in _include_paths(include_path):
        check_task_folder(path, "--include_path")
    for task in tasks or ():
        for name in str(task).split(","):
            if name and os.path.lexists(name):
                check_task_folder(name, "--tasks")


def _include_paths(include_path) -> List[str]:
    if not include_path:
        return []
    paths = list(include_path) if isinstance(include_path, (list, tuple)) else [str(include_path)]
    out = []
    for p in paths:
        out += [p] if os.path.lexists(p) else [q for q in p.split(os.pathsep) if q and os.path.lexists(q)]
    return out


def _check_yaml(path: str, root: str, flag: str) -> None:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except (OSError, yaml.YAMLError) as e:
        _refuse(flag, path, f"cannot be read as YAML ({e})")
    if "!function" in text:
        _refuse(flag, path, "holds !function, which runs Python when lm_eval loads it")
    for node in nodes:
        for tag in _tags(node):
            if tag not in _PLAIN_TAGS:
                _refuse(flag, path, f"holds the YAML tag {tag!r}, which builds a Python object or calls a function")
    for doc in yaml.safe_load_all(text):
        includes = doc.get("include") if isinstance(doc, dict) else None
        for inc in includes if isinstance(includes, list) else [includes] if includes is not None else []:
            target = os.path.realpath(os.path.join(os.path.dirname(path), str(inc)))
            if os.path.commonpath([root, target]) != root:
                _refuse(flag, path, f"includes {inc!r}, outside the task folder")


def _tags(node):
    stack = [node]
    while stack:
        n = stack.pop()
        if n is None:
            continue
        yield n.tag
        if isinstance(n, yaml.SequenceNode):
            stack += n.value
        elif isinstance(n, yaml.MappingNode):
            stack += [x for pair in n.value for x in pair]


def _refuse(flag: str, path: str, why: str) -> None:
    raise ConfigError(f"{flag}: {path} {why}; lm_eval would run it. Only include a task folder you wrote yourself "
                      "(python launch/consolidate.py --lm-eval-text writes one beside the export, <out>-lm_eval_tasks), "
                      "never one that came with an export or from someone else")
