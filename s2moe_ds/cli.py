"""Command-line flags generated from the config dataclasses, so each field has one home.

A field `noise_scale` becomes `--noise-scale`; flags default to "not given", so presets and the
dataclass defaults apply unless the user overrides them.
"""

import argparse
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Dict, Iterable


def _parser_type(type_name: str):
    name = str(type_name)
    if "bool" in name:
        return None
    if "int" in name:
        return int
    if "float" in name:
        return float
    return str


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str, skip: Iterable[str] = ()) -> None:
    group = parser.add_argument_group(title)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        if f.name in skip or is_dataclass(default) or f.default_factory is not MISSING:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _parser_type(f.type)
        help_text = f"(default: {default})"
        if kind is None:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif "tuple" in str(f.type) or "Sequence" in str(f.type):
            # Element type from the annotation: Sequence[int], Sequence[str]; a bare tuple holds floats.
            elem = int if "int" in str(f.type) else str if "str" in str(f.type) else float
            group.add_argument(flag, dest=f.name, type=elem, nargs="+", default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


def given(ns: argparse.Namespace, cls, skip: Iterable[str] = ()) -> Dict[str, Any]:
    """The fields of `cls` the user set on the command line."""
    out = {}
    for f in fields(cls):
        value = getattr(ns, f.name, None)
        if f.name not in skip and value is not None:
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out
