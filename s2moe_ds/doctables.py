"""Tables in docs/ that are written from the code, so that they cannot drift from it.

Four kinds of region, each between marker comments that a reader of the rendered page never sees:

    <!-- fields: block.s2moe noise_scale noise_stats -->      a config's fields: name, flag,
    ...                                                      type, default and docstring (the
    <!-- end fields -->                                      same text as the flag's --help)

    <!-- ds-configs -->                                      ds_configs/*.json: optimizer,
    ...                                                      batch, clipping, ZeRO, bf16
    <!-- end ds-configs -->

    <!-- presets -->                                         train/presets.py: each preset's
    ...                                                      sizes, data and schedule
    <!-- end presets -->

    <!-- variants -->                                        launch/compare.py's built-in
    ...                                                      variants and the fields they set
    <!-- end variants -->

A fields marker names a config (`moe`, `model`, `train`, `data`, `parallel`, `eval`, `finetune`,
`block.<kind>`, `router.<name>`, `backbone.<name>`), then, optionally, which of its fields to show
(all of them otherwise); several configs in one table are separated by `;` and their fields are
then written `<config>.<field>`. `python -m s2moe_ds.doctables docs/` rewrites every region;
tests/unit/test_docs.py fails when a page differs from what this module writes.
"""

import dataclasses
import glob
import json
import os
import re
import sys
from typing import Dict, Iterator, List, Tuple

from .cli import field_docs
from .config import ConfigError

FIELDS = re.compile(r"(<!-- fields: (?P<spec>[^>]*?) -->\n).*?(<!-- end fields -->)", re.S)
DS_CONFIGS = re.compile(r"(<!-- ds-configs -->\n).*?(<!-- end ds-configs -->)", re.S)
PRESETS = re.compile(r"(<!-- presets -->\n).*?(<!-- end presets -->)", re.S)
VARIANTS = re.compile(r"(<!-- variants -->\n).*?(<!-- end variants -->)", re.S)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def configs() -> Dict[str, type]:
    """Every config a page may name, by the name its marker uses."""
    from .data import ClassificationDataConfig, DataConfig
    from .eval.evaluate import EvalConfig
    from .models import BACKBONES, ModelConfig
    from .moe import BLOCKS, ROUTERS, MoEConfig
    from .parallel import ParallelConfig
    from .train import TrainConfig
    from .train.finetune import FinetuneConfig
    named = {"model": ModelConfig, "moe": MoEConfig, "parallel": ParallelConfig, "data": DataConfig,
             "train": TrainConfig, "eval": EvalConfig, "finetune": FinetuneConfig,
             "classification_data": ClassificationDataConfig}
    named.update({f"block.{k}": s.config for k, s in BLOCKS.items() if s.config is not None})
    named.update({f"router.{k}": s.config for k, s in ROUTERS.items() if s.config is not None})
    named.update({f"backbone.{k}": s.settings for k, s in BACKBONES.items() if s.settings is not None})
    return named


def _flags() -> Dict[Tuple[type, str], str]:
    """(config class, field) -> its flag in launch/pretrain.py, finetune.py or evaluate.py."""
    from .cli import evaluate_sections, finetune_sections, pretrain_sections, _parser_type
    out = {}
    for section in [*pretrain_sections(), *finetune_sections(), *evaluate_sections()]:
        for f in section.fields():
            flag = section.flag(f.name)
            if _parser_type(f.type) is None:  # a switch: --s2moe.fused and --s2moe.no-fused
                flag = flag.replace(".", ".[no-]", 1)
            out.setdefault((section.cls, f.name), flag)
    return out


def _type_name(annotation) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else "`''`"
    return f"`{value!r}`"


def _cell(text: str) -> str:
    """Docstring text safe in a Markdown table cell: a | ends the cell, a * starts emphasis."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")


def _parse(spec: str) -> List[Tuple[str, List[str]]]:
    groups = []
    for part in spec.split(";"):
        words = part.split()
        if not words:
            raise ConfigError(f"fields marker {spec!r}: an empty part between ';'; name a config in each")
        groups.append((words[0], words[1:]))
    return groups


def fields_table(spec: str) -> str:
    """The Markdown table a `<!-- fields: spec -->` marker holds."""
    known = configs()
    groups = _parse(spec)
    flags = _flags()
    rows = ["| field | flag | type | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, wanted in groups:
        if name not in known:
            raise ConfigError(f"fields marker {spec!r}: no config named {name!r}; one of {', '.join(sorted(known))}")
        cls = known[name]
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        missing = [w for w in wanted if w not in by_name]
        if missing:
            raise ConfigError(f"fields marker {spec!r}: {cls.__name__} has no field {', '.join(missing)}; "
                              f"its fields are {', '.join(by_name)}")
        docs = field_docs(cls)
        prefix = (name.split(".")[-1] + ".") if len(groups) > 1 else ""
        for field_name in wanted or list(by_name):
            f = by_name[field_name]
            flag = flags.get((cls, f.name))
            rows.append(f"| `{prefix}{f.name}` | {f'`{flag}`' if flag else '-'} | {_type_name(f.type)} | {_default(f)} | "
                        f"{_cell(docs.get(f.name, ''))} |")
    return "\n".join(rows) + "\n"


def _ds_row(path: str) -> str:
    with open(path) as fh:
        cfg = json.load(fh)
    opt = cfg.get("optimizer") or {}
    p = opt.get("params", {})
    batch = (f"global {cfg['train_batch_size']}" if "train_batch_size" in cfg
             else f"micro {cfg.get('train_micro_batch_size_per_gpu')} per rank")
    zero = cfg.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device")
    adam = "torch's" if p.get("torch_adam") else "DeepSpeed's"
    schedule = (cfg.get("scheduler") or {}).get("type", "the trainer's")
    betas = "/".join(str(b) for b in p.get("betas", [])) or "-"
    return (f"| `ds_configs/{os.path.basename(path)}` | {opt.get('type', '-')} ({adam}) | {p.get('lr', '-')} | "
            f"{betas} | {p.get('weight_decay', '-')} | {batch}, accumulation {cfg.get('gradient_accumulation_steps', 1)} | "
            f"{cfg.get('gradient_clipping', '-')} | {zero.get('stage', 0)}{', optimizer on ' + offload if offload else ''} | "
            f"{schedule} | {(cfg.get('bf16') or {}).get('enabled', False)} |")


def ds_configs_table(root: str = ROOT) -> str:
    """One row per ds_configs/*.json: what each DeepSpeed config trains with."""
    rows = ["| file | optimizer | lr | betas | weight decay | batch | clipping | ZeRO stage | schedule | bf16 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows += [_ds_row(p) for p in sorted(glob.glob(os.path.join(root, "ds_configs", "*.json")))]
    return "\n".join(rows) + "\n"


def presets_table() -> str:
    """One row per preset of train/presets.py: the experiment it starts from."""
    from .train import PRESETS as presets
    rows = ["| preset | backbone | layers | d_model | heads | d_inner | experts, k | block, router | dropout | "
            "seq_len | data | steps | lr, warmup |", "| --- " * 13 + "|"]
    for name, build in presets.items():
        e = build()
        m = e.model
        lr = "the DeepSpeed config's" if e.train.lr is None else e.train.lr
        rows.append(f"| `{name}` | {m.backbone} | {m.n_layer} | {m.d_model} | {m.n_head} | {m.d_inner} | "
                    f"{m.moe.num_experts}, {m.moe.k} | {m.moe.block}, {m.moe.router} | {m.dropout} | {e.train.seq_len} | "
                    f"{e.data.dataset} | {e.train.max_steps:,} | {lr}, {e.train.warmup_steps} |")
    return "\n".join(rows) + "\n"


def variants_table() -> str:
    """One row per built-in variant of launch/compare.py: the MoEConfig fields it sets."""
    from .experiments.compare import BUILTIN_VARIANTS
    rows = ["| variant | fields it sets |", "| --- | --- |"]
    for name, fields_set in BUILTIN_VARIANTS.items():
        rows.append(f"| `{name}` | {', '.join(f'`{k}={v}`' for k, v in fields_set.items())} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    """The page with every marked region rewritten from the code."""
    text = FIELDS.sub(lambda m: m.group(1) + fields_table(m.group("spec")) + m.group(3), text)
    text = PRESETS.sub(lambda m: m.group(1) + presets_table() + m.group(2), text)
    text = VARIANTS.sub(lambda m: m.group(1) + variants_table() + m.group(2), text)
    return DS_CONFIGS.sub(lambda m: m.group(1) + ds_configs_table() + m.group(2), text)


def documented_fields(text: str) -> Iterator[Tuple[str, str]]:
    """(config, field) for every field a page's tables show."""
    known = configs()
    for m in FIELDS.finditer(text):
        for name, wanted in _parse(m.group("spec")):
            yield from ((name, w) for w in (wanted or [f.name for f in dataclasses.fields(known[name])]))


def main(argv: List[str]) -> int:
    folder = argv[0] if argv else os.path.join(ROOT, "docs")
    for path in sorted(glob.glob(os.path.join(folder, "*.md"))):
        with open(path) as fh:
            old = fh.read()
        new = render(old)
        if new != old:
            with open(path, "w") as fh:
                fh.write(new)
            print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
