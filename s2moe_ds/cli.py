"""The command lines of launch/*.py, generated from the config dataclasses: one flag per field,
named by the section it belongs to.

A section is a config: `model`, `moe`, `parallel`, `data`, `train` (`finetune` and `eval` in their
scripts), or the own settings of a registry entry, named after it (backbone `txl`, block kind
`s2moe`, router `xmoe`). Field `noise_scale` of section `s2moe` is `--s2moe.noise-scale`, stored
under the destination "s2moe.noise_scale": two sections may have fields of one name (a router's
`dropout` beside the model's) and never collide. A field's leading `<section>_` is dropped from its
flag (`xmoe_dim` is `--xmoe.dim`), never from the field, which checkpoints and run_config.json hold.

Each field also answers to its plain name (`--noise-scale`, `--xmoe-dim`), the spelling of every
command line written before sections, when one section owns that name: a core section's field
(model, moe, parallel, data, train, ...) before a registry entry's, so a new router cannot change
what an old command means. A plain name that two sections of one rank share has no alias: it is
refused with the sectioned choices, and --help lists it. Flags default to "not given", so presets
and the dataclass defaults apply unless the user overrides them. `python -m s2moe_ds.cli docs/cli.md`
writes every script's --help there.
"""

import argparse
import ast
import functools
import inspect
import sys
import textwrap
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple


NESTED = ("moe", "block_config", "router_config", "backbone_config")
"""Fields that hold another config, which gets a section of its own."""

SPELLED = "_flag_spellings"
"""Namespace attribute: {destination: the option string the user typed}, for messages in their words."""


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> Dict[str, str]:
    """The docstring under each field of a dataclass, as written in its source."""
    docs = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _parser_type(type_name) -> Optional[type]:
    name = str(type_name)
    if "bool" in name:
        return None
    if "int" in name:
        return int
    if "float" in name:
        return float
    return str


def _dashed(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class Section:
    """The flags of one config: `--<name>.<key>` per field of `cls`, one --help group."""

    name: str
    """The section, as flags spell it after `--` (dashes) and destinations before the dot."""
    cls: type
    title: str = ""
    """The help group's heading after the section's name."""
    skip: Tuple[str, ...] = ()
    defaults: Any = None
    """An instance whose values --help shows as defaults (a preset's); None: the dataclass's."""
    note: str = ""
    entry: Tuple[str, str, str] = ()
    """(kind, key, owner) for a registry entry's settings, e.g. ('router', 'xmoe', 'moe'): the
    field owner.kind must be key for these flags to apply. Empty for a core section."""

    @property
    def core(self) -> bool:
        return not self.entry

    def fields(self) -> List[Field]:
        return [f for f in fields(self.cls) if f.name not in self.skip and f.name not in NESTED]

    def key(self, name: str) -> str:
        """The field's name in its flag: without a leading `<entry or section>_`, unless that would
        leave nothing or another field's name."""
        prefix = (self.entry[1] if self.entry else self.name).replace("-", "_") + "_"
        short = name[len(prefix):] if name.startswith(prefix) else name
        return name if not short or short in {f.name for f in fields(self.cls)} else short

    def flag(self, name: str, negated: bool = False) -> str:
        return f"--{_dashed(self.name)}.{'no-' if negated else ''}{_dashed(self.key(name))}"

    def dest(self, name: str) -> str:
        return f"{self.name}.{name}"


def _plain_flags(f: Field) -> Tuple[str, ...]:
    """Today's spelling of a field's flag (and of its negation, for a switch)."""
    flag = "--" + _dashed(f.name)
    return (flag, "--no-" + _dashed(f.name)) if _parser_type(f.type) is None else (flag,)


class _Store(argparse.Action):
    """A field's value, with the spelling the user typed kept for messages."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(values) if isinstance(values, list) else values)
        vars(namespace).setdefault(SPELLED, {})[self.dest] = option_string


class _Switch(argparse.Action):
    """A boolean field: True from its flag, False from the flag's `no-` spelling."""

    def __init__(self, option_strings, dest, negations=(), **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.negations = set(negations)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string not in self.negations)
        vars(namespace).setdefault(SPELLED, {})[self.dest] = option_string


class _Shared(argparse.Action):
    """A plain name that several sections have: refused with the sectioned flags to use instead."""

    def __init__(self, option_strings, dest, choices_text="", **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="*", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.choices_text = choices_text

    def __call__(self, parser, namespace, values, option_string=None):
        raise argparse.ArgumentError(self, f"several sections have this field; use {self.choices_text}")


def plan_aliases(sections: Sequence[Section], taken: Set[str]) -> Tuple[Dict[Tuple[str, str], Tuple[str, ...]],
                                                                       Dict[Tuple[str, ...], List[str]]]:
    """Which plain flags are aliases of which (section, field), and which plain flags several
    sections claim (each with the sectioned flags it could mean). The core sections claim a name
    before registry entries; a flag already in `taken` (the script's own, DeepSpeed's) is nobody's."""
    owners: Dict[str, List[Tuple[Section, Field]]] = {}
    for section in sections:
        for f in section.fields():
            owners.setdefault(f.name, []).append((section, f))
    aliases, shared = {}, {}
    for name, claims in owners.items():
        first = [c for c in claims if c[0].core] or claims
        flags = tuple(dict.fromkeys(s for _, f in first for s in _plain_flags(f)))
        if set(flags) & taken:
            continue
        taken.update(flags)
        if len(first) == 1:
            aliases[(first[0][0].name, name)] = flags
        else:
            shared[flags] = [s.flag(f.name) for s, f in claims]
    return aliases, shared


def _add_field(group, section: Section, f: Field, strings: Sequence[str], help_text: str) -> None:
    """The flag `strings[0]` of field f (for a switch, strings[1:] are its negations)."""
    kind = _parser_type(f.type)
    dest = section.dest(f.name)
    if kind is None:
        group.add_argument(*strings, dest=dest, action=_Switch, negations=strings[1:], default=None, help=help_text)
        return
    text = str(f.type)
    sequence = "tuple" in text or "Sequence" in text
    if sequence:  # element type from the annotation: Sequence[int], Sequence[str]; a bare tuple holds floats
        kind = int if "int" in text else str if "str" in text else float
    metavar = {int: "INT", float: "FLOAT"}.get(kind, section.key(f.name).upper())
    group.add_argument(*strings, dest=dest, action=_Store, type=kind, nargs="+" if sequence else None,
                       metavar=metavar, default=None, help=help_text)


def add_sections(parser: argparse.ArgumentParser, sections: Sequence[Section], reserved: Iterable[str] = ()) -> None:
    """Each section's flags in a help group headed by its name, the plain-name aliases hidden
    beside them, and a word on both in the description. `reserved`: flags the parser gets later."""
    taken = {s for action in parser._actions for s in action.option_strings} | set(reserved)
    aliases, shared = plan_aliases(sections, taken)
    for section in sections:
        summary = " ".join((section.cls.__doc__ or "").strip().split("\n\n")[0].split())
        heading = f"{_dashed(section.name)}: {section.title}" if section.title else _dashed(section.name)
        group = parser.add_argument_group(heading, " ".join(p for p in (summary, section.note) if p) or None)
        docs = field_docs(section.cls)
        mains = {section.flag(f.name) for f in section.fields()}
        for f in section.fields():
            default = getattr(section.defaults, f.name) if section.defaults is not None else \
                f.default if f.default is not MISSING else None
            help_text = (docs.get(f.name, "") + f" (default: {default})").strip().replace("%", "%%")
            # A switch's --SECTION.no-KEY, unless a field named no_KEY has that flag already.
            negation = [section.flag(f.name, negated=True)] if len(_plain_flags(f)) > 1 else []
            strings = [section.flag(f.name)] + [s for s in negation if s not in mains]
            _add_field(group, section, f, strings, help_text)
            if (section.name, f.name) in aliases:
                _add_field(group, section, f, aliases[(section.name, f.name)], argparse.SUPPRESS)
    for flags, choices in shared.items():
        parser.add_argument(*flags, action=_Shared, choices_text=" or ".join(choices))
    parser.description = (parser.description or "") + "\n\n" + _naming_note(sections, shared)


def _naming_note(sections: Sequence[Section], shared: Dict[Tuple[str, ...], List[str]]) -> str:
    example = next(((s, f.name) for s in sections for f in s.fields() if s.key(f.name) != f.name),
                   (sections[0], sections[0].fields()[0].name))
    text = (f"Flags are --SECTION.KEY, KEY the field's name without a leading SECTION_ (field {example[1]} is "
            f"{example[0].flag(example[1])}); the sections, one group each below (--help SECTION prints one): "
            f"{', '.join(_dashed(s.name) for s in sections)}. A field's plain name (--{_dashed(example[1])}) "
            "still works, as before sections, where one section owns the name (a core section before the "
            "settings of a backbone, block kind or router).")
    if shared:
        text += " Plain names that several sections share are refused: " + "; ".join(
            f"{flags[0]} ({' or '.join(choices)})" for flags, choices in shared.items()) + "."
    return text


def given(ns: argparse.Namespace, section: Section) -> Dict[str, Any]:
    """The fields of `section` the user set on the command line."""
    out = {}
    for f in section.fields():
        value = getattr(ns, section.dest(f.name), None)
        if value is not None:
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def spelling(ns: argparse.Namespace, section: Section, name: str) -> str:
    """The flag the user gave field `name` of `section` with: theirs if typed, else the sectioned one."""
    return vars(ns).get(SPELLED, {}).get(section.dest(name), section.flag(name))


def registry_sections(kind: str, registry: Dict[str, Any], attr: str, owner: str, taken: Set[str]) -> List[Section]:
    """A section per entry of `registry` with settings (spec.<attr>), named after the entry, or
    `<kind>_<entry>` where a section of that name exists already (a block kind 'moe' with
    settings would otherwise meet MoEConfig's section)."""
    out = []
    for key, spec in registry.items():
        cls = getattr(spec, attr)
        if cls is None:
            continue
        name = key
        while _dashed(name) in taken:
            name = f"{kind}_{name}"
        taken.add(_dashed(name))
        out.append(Section(name, cls, f"settings of {kind} {key!r} (with --{owner}.{kind} {key})",
                           entry=(kind, key, owner)))
    return out


def _deepspeed_flags() -> List[str]:
    import deepspeed
    scratch = deepspeed.add_config_arguments(argparse.ArgumentParser(add_help=False))
    return [s for action in scratch._actions for s in action.option_strings]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help text from a third of the width on, so that a sectioned flag (--moe.num-experts INT)
    mostly fits beside its help; a description paragraph written on one line (a section's docstring,
    the word on flag names) is filled to the width, one laid out over lines is kept as written."""

    def __init__(self, prog, width=None):
        import shutil
        width = width or shutil.get_terminal_size().columns - 2
        super().__init__(prog, width=width, max_help_position=max(24, width // 3))

    def _fill_text(self, text, width, indent):
        return "\n\n".join(textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent)
                           if "\n" not in p else super(_Formatter, self)._fill_text(p, width, indent)
                           for p in text.split("\n\n"))


class _Help(argparse.Action):
    """-h/--help prints every flag; --help SECTION only that section's group."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS, metavar="SECTION",
                         help="show this help, or only the flags of SECTION (e.g. --help moe), and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            parser.print_help()
            parser.exit()
        groups = {g.title.split(":")[0]: g for g in parser._action_groups if g._group_actions}
        if values not in groups:
            parser.error(f"--help: no section {values!r}; the sections: {', '.join(groups)}")
        formatter = parser._get_formatter()
        formatter.start_section(groups[values].title)
        formatter.add_text(groups[values].description)
        formatter.add_arguments(groups[values]._group_actions)
        formatter.end_section()
        parser._print_message(formatter.format_help(), sys.stdout)
        parser.exit()


def _parser(prog: str, description: str, width: Optional[int], usage: Optional[str] = None,
            sectioned: bool = False) -> argparse.ArgumentParser:
    """A script's parser; `sectioned` (flags from add_sections) gives --help SECTION."""
    formatter = functools.partial(_Formatter, width=width) if width else _Formatter
    parser = argparse.ArgumentParser(prog=prog, usage=usage, description=textwrap.dedent(description).strip(),
                                     formatter_class=formatter, add_help=not sectioned)
    if sectioned:
        parser.add_argument("-h", "--help", action=_Help)
    return parser


# ----------------------------------------------------------------------------- launch/pretrain.py

PRETRAIN = """
Pretrain a language model with DeepSpeed: S2MoE, DeepSpeed's MoE (SMoE) or dense blocks.

    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config ds_configs/zero2.json \\
        --preset tiny --ep-size 2 --out-dir runs/tiny

Runs under the deepspeed launcher, torchrun and mpirun (DeepSpeed's MPI discovery), on CPU (gloo)
and CUDA (NCCL). Batch sizes, precision, ZeRO, clipping and the optimizer come from the DeepSpeed
config. Every flag is validated before any compute; errors name the field and exit with status 2.
On SIGUSR1/SIGTERM the run checkpoints and exits with status 75 (requeue me).
"""


def pretrain_sections() -> List[Section]:
    """launch/pretrain.py's sections, in --help's order: the model, each backbone's settings, the
    moe blocks, each block kind's and router's settings, the layout, the data, the loop."""
    from .data import DataConfig
    from .models import BACKBONES, ModelConfig
    from .moe import BLOCKS, ROUTERS, MoEConfig
    from .parallel import ParallelConfig
    from .train import PRESETS, TrainConfig
    model = PRESETS["tiny"]().model
    note = "Defaults shown are the tiny preset's."
    taken = {"model", "moe", "parallel", "data", "train"}
    backbones = registry_sections("backbone", BACKBONES, "settings", "model", taken)
    blocks = registry_sections("block", BLOCKS, "config", "moe", taken)
    routers = registry_sections("router", ROUTERS, "config", "moe", taken)
    return [Section("model", ModelConfig, skip=("vocab_size", ), defaults=model, note=note), *backbones,
            Section("moe", MoEConfig, "the feed-forward blocks", defaults=model.moe, note=note), *blocks, *routers,
            Section("parallel", ParallelConfig, "the parallel layout"), Section("data", DataConfig),
            Section("train", TrainConfig, "the training loop")]


def pretrain_parser(width: Optional[int] = None) -> argparse.ArgumentParser:
    import deepspeed

    from .train import PRESETS
    from .train.presets import PROTOCOLS
    parser = _parser("launch/pretrain.py", PRETRAIN, width, sectioned=True,
                     usage="[deepspeed|torchrun|mpirun ...] launch/pretrain.py --deepspeed_config FILE [flags]")
    parser.add_argument("--preset", default="tiny", choices=tuple(PRESETS),
                        help="the experiment the flags below change (s2moe_ds/train/presets.py) (default: tiny)")
    parser.add_argument("--protocol", default="deepspeed", choices=tuple(PROTOCOLS),
                        help="'sister' trains as the S2MoE authors' sister code does where it differs from "
                             "DeepSpeed's MoE (ReLU experts, no token drops, deterministic top-k, the balance loss "
                             "over all top-k assignments, InfoNCE negatives over the data-parallel batch; "
                             "s2moe_ds/train/presets.py), before the flags below "
                             "(default: deepspeed)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    add_sections(parser, pretrain_sections(), reserved=_deepspeed_flags())
    return deepspeed.add_config_arguments(parser)


def experiment_from_args(ns: argparse.Namespace):
    """The ExperimentConfig launch/pretrain.py's flags describe: the preset with the given fields.
    A backbone's, block kind's or router's settings go into its config when the run uses that
    entry, and are refused otherwise, named as the user typed them."""
    from .config import ConfigError
    from .train import PRESETS, apply_overrides
    from .train.presets import apply_protocol
    experiment = apply_protocol(PRESETS[ns.preset](), ns.protocol)
    sections = {s.name: s for s in pretrain_sections()}
    model, moe = given(ns, sections["model"]), given(ns, sections["moe"])
    chosen = {"backbone": model.get("backbone", experiment.model.backbone),
              "block": moe.get("block", experiment.model.moe.block),
              "router": moe.get("router", experiment.model.moe.router)}
    for section in sections.values():
        settings = given(ns, section) if section.entry else {}
        if not settings:
            continue
        kind, key, owner = section.entry
        if chosen[kind] != key:
            raise ConfigError(f"{spelling(ns, section, next(iter(settings)))}: is a setting of {kind} {key!r}, but "
                              f"this run's {owner}.{kind} is {chosen[kind]!r}; drop it or pass --{owner}.{kind} {key}")
        (model if owner == "model" else moe)[f"{kind}_config"] = settings
    overrides = {"model": {**model, "moe": moe}, "parallel": given(ns, sections["parallel"]),
                 "data": given(ns, sections["data"]), "train": given(ns, sections["train"])}
    return apply_overrides(experiment, overrides)


def run_training(args: argparse.Namespace, build, example_config: str) -> int:
    """The main of launch/pretrain.py and launch/finetune.py: build(args) returns run(ds_config) ->
    the trainer's final metrics; every ConfigError (flags, DeepSpeed config, data, checkpoint) is
    printed and exits with status 2 before any compute, a bad loss or a failed checkpoint write
    with 1, a stop signal with EXIT_REQUEUE."""
    import sys

    from .config import ConfigError
    from .parallel import check_ds_config, load_ds_config
    from .checkpoint import CheckpointWriteError
    from .train import EXIT_REQUEUE, UnhealthyLossError
    try:
        run = build(args)
        if not args.deepspeed_config:
            raise ConfigError(f"--deepspeed_config: required, e.g. {example_config}")
        ds_config = load_ds_config(args.deepspeed_config)
        check_ds_config(ds_config)
        final = run(ds_config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (UnhealthyLossError, CheckpointWriteError) as e:  # the message says all: no traceback
        print(f"\nerror: {e}", file=sys.stderr)  # below the progress bar
        return 1
    return EXIT_REQUEUE if final["stopped_by"] else 0


def exit_with(main) -> None:
    """The end of launch/pretrain.py and launch/finetune.py: main()'s status (1 with the traceback
    for an error it did not name), by os._exit once stdout and stderr are flushed. A normal
    interpreter exit runs the C++ destructors of torch's process groups, and gloo's threads then
    sometimes abort the process (status -6, "terminate called without an active exception": 4
    of 10 runs of one bad-data command, and a fine-tuning job under srun); the launcher reports
    that status instead of ours. Everything the run writes is closed and flushed before this."""
    import os
    import sys
    import traceback
    try:
        code = main()
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    mpi = sys.modules.get("mpi4py.MPI")  # DeepSpeed's discovery under mpirun initialises MPI
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # else mpirun reports a process that exited without finalising, and fails
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

# ----------------------------------------------------------------------------- launch/finetune.py

FINETUNE = """
Fine-tune a pretrained checkpoint as a text classifier with DeepSpeed, then evaluate it with one
and with two experts per token.

    deepspeed --num_gpus 2 launch/finetune.py --deepspeed_config ds_configs/finetune.json \\
        --pretrained runs/tiny --dataset files --path my_data --ep-size 2 --out-dir runs/ft

Any checkpoint of launch/pretrain.py (any block kind, router, backbone, ZeRO stage, process count
and ep_size) on any layout; the same launchers, signals, checkpoints and --resume as pretraining.
Data: SST-2, SST-5, IMDB, BANKING77 by name (the hub, or --path with a save_to_disk copy), a folder
of train/valid/test .csv or .jsonl files, or tinyshakespeare's speeches by speaker. Writes
OUT_DIR/finetune_eval.json: accuracy and macro-F1 on valid and test with each --eval-k.
"""


def finetune_sections() -> List[Section]:
    """launch/finetune.py's sections: the fine-tuning, its data, the layout, the loop."""
    from .data import ClassificationDataConfig
    from .parallel import ParallelConfig
    from .train import TrainConfig
    from .train.finetune import FinetuneConfig
    return [Section("finetune", FinetuneConfig, skip=("data", "moe_overrides")),
            Section("data", ClassificationDataConfig, "the labelled texts"),
            Section("parallel", ParallelConfig, "the parallel layout"),
            Section("train", TrainConfig, "the training loop", skip=("seq_len", ),
                    note="out_dir defaults to runs/finetune; texts are at most the model's max_seq_len.")]


def finetune_parser(width: Optional[int] = None) -> argparse.ArgumentParser:
    import deepspeed
    parser = _parser("launch/finetune.py", FINETUNE, width, sectioned=True,
                     usage="[deepspeed|torchrun|mpirun ...] launch/finetune.py --deepspeed_config FILE "
                           "--pretrained CKPT [flags]")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a moe field of the pretrained model for fine-tuning, e.g. "
                             "uncertainty_coef=0 or balance_coef=0 (repeatable)")
    add_sections(parser, finetune_sections(), reserved=_deepspeed_flags())
    return deepspeed.add_config_arguments(parser)


def finetune_from_args(ns: argparse.Namespace):
    """(FinetuneConfig, ExperimentConfig) of launch/finetune.py's flags."""
    from .config import ConfigError
    from .data import ClassificationDataConfig
    from .experiments.compare import parse_assignment
    from .train.finetune import FinetuneConfig, finetune_experiment
    overrides = {}
    for spec in ns.set:
        key, values = parse_assignment(spec, "--set")
        if len(values) != 1:
            raise ConfigError(f"--set: {spec!r} must give exactly one value")
        overrides[key] = values[0]
    sections = {s.name: s for s in finetune_sections()}
    cfg = FinetuneConfig(**given(ns, sections["finetune"]), moe_overrides=overrides,
                         data=ClassificationDataConfig(**given(ns, sections["data"])))
    return cfg, finetune_experiment(cfg, given(ns, sections["parallel"]), given(ns, sections["train"]))


# ----------------------------------------------------------------------------- launch/evaluate.py

EVALUATE = """
Evaluate a checkpoint with one and with two experts per token, next to the inference FLOPs.

    python launch/evaluate.py --checkpoint runs/tiny                 # valid + test, eval_k 1 and 2
    python launch/evaluate.py --checkpoint runs/tiny --analysis      # + what the experts learned

Any checkpoint of launch/pretrain.py works, whatever its ZeRO stage, process count or ep_size: it
is consolidated and evaluated on one process (CUDA if present). Full passes over each split, no
sampling: every number but tokens/s is identical from run to run. Writes <run>/eval/<step>/eval.json,
and with --analysis analysis.json, plots/*.png and TensorBoard events (tensorboard/).
"""


def evaluate_sections() -> List[Section]:
    """launch/evaluate.py's sections: what to evaluate, and overrides of the checkpoint's data."""
    from .data import DataConfig
    from .eval.evaluate import EvalConfig
    return [Section("eval", EvalConfig, skip=("data_overrides", )),
            Section("data", DataConfig, "overrides of the checkpoint's data settings")]


def evaluate_parser(width: Optional[int] = None) -> argparse.ArgumentParser:
    parser = _parser("launch/evaluate.py", EVALUATE, width, sectioned=True,
                     usage="launch/evaluate.py --checkpoint RUN [flags]")
    add_sections(parser, evaluate_sections())
    return parser


def eval_config_from_args(ns: argparse.Namespace):
    """The EvalConfig of launch/evaluate.py's flags."""
    from .eval.evaluate import EvalConfig
    sections = evaluate_sections()
    return EvalConfig(**given(ns, sections[0]), data_overrides=given(ns, sections[1]))


# ----------------------------------------------------------------------------- the others

GENERATE = """
Sample text from a checkpoint, with one expert per token by default (S2MoE's inference mode).

    python launch/generate.py --checkpoint runs/tiny --prompt "The " --max-new-tokens 200
"""


def generate_parser(width: Optional[int] = None) -> argparse.ArgumentParser:
    parser = _parser("launch/generate.py", GENERATE, width)
    parser.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder, or a step folder")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: all)")
    parser.add_argument("--eval-k", type=int, default=1, help="experts per token (default: 1)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to print (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    return parser


CONSOLIDATE = """
Turn a checkpoint (ZeRO 0/1/2, any ep_size) into one fp32 model on one process: our own file, or
a Hugging Face export that Transformers and lm-evaluation-harness load.

    python launch/consolidate.py runs/tiny --out runs/tiny/model_fp32.pt
    python launch/consolidate.py runs/tiny --format hf --out runs/tiny/hf --lm-eval-text ../shared/data/tinyshakespeare.txt

--format pt: one file {"format", "state_dict", "model_config", "tokenizer"}; load it with
s2moe_ds.models.build_model(model_config_from_dict(model_config)).load_state_dict(state_dict).
--format hf (needs pip install -e '.[hf]'): a folder with model.safetensors, config.json and the
tokenizer, and no Python; after `import s2moe_ds.hf`, AutoModelForCausalLM.from_pretrained(folder)
gives our logits (from_pretrained(..., eval_k=2) for two experts per token), with no
trust_remote_code. --lm-eval-text adds an lm-evaluation-harness perplexity task on that file and
prints the command that runs it (python -m s2moe_ds.hf.lm_eval --model s2moe ...).
"""


def consolidate_parser(width: Optional[int] = None) -> argparse.ArgumentParser:
    parser = _parser("launch/consolidate.py", CONSOLIDATE, width)
    parser.add_argument("checkpoint", help="run folder, its checkpoints/ folder, or a step folder")
    parser.add_argument("--tag", default=None, help="step folder name (default: latest)")
    parser.add_argument("--out", required=True, help="output file (.pt) or, with --format hf, folder")
    parser.add_argument("--force", action="store_true",
                        help="with --format pt: replace an existing --out file that consolidate did not write "
                             "(never a folder, nor a file inside a checkpoint)")
    parser.add_argument("--format", choices=("pt", "hf"), default="pt",
                        help="pt: one torch file of ours; hf: a Hugging Face Transformers folder (default: pt)")
    parser.add_argument("--lm-eval-text", default=None,
                        help="with --format hf: a text file to score with lm-evaluation-harness "
                             "(writes <out>-lm_eval_tasks/s2moe_text.yaml, beside the export)")
    parser.add_argument("--remote-code-shims", action="store_true",
                        help="with --format hf: also write the .py files and auto_map that "
                             "trust_remote_code=True loads, for tools that never import s2moe_ds "
                             "(default: an export without Python, loaded after import s2moe_ds.hf)")
    return parser


COMPARE = """
Train and evaluate variants side by side: same budget, several seeds, one table.

    python launch/compare.py --path ../shared/data/tinyshakespeare.txt --seeds 1 2 3 \\
        --max-steps 2000 --out runs/compare
    python launch/compare.py --path ... --variants s2moe --ablate uncertainty_coef=0,0.5,1.0

Each (variant, seed) trains with launch/pretrain.py under the deepspeed launcher, then is evaluated
on valid and test with 1 and with 2 experts per token (full passes). Writes OUT/NAME.md (mean ± std
over seeds), NAME.json and NAME_curves.png. A run whose result.json records the same command is
reused, so an interrupted comparison continues. Flags not listed here pass through to
launch/pretrain.py.
"""


def compare_parser(width: Optional[int] = None) -> argparse.ArgumentParser:
    from .experiments.compare import BUILTIN_VARIANTS
    parser = _parser("launch/compare.py", COMPARE, width)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--path", help="a text file (split 90/5/5) or a folder saved with datasets")
    data.add_argument("--dataset", help="embedded | enwik8 | text8 | wikitext-103 | one-billion-word")
    parser.add_argument("--variants", nargs="*", default=["smoe", "s2moe", "s2moe-top1"],
                        help=f"built-in variants: {', '.join(BUILTIN_VARIANTS)} (default: smoe s2moe s2moe-top1)")
    parser.add_argument("--ablate", action="append", default=[], metavar="FIELD=V1,V2",
                        help="one extra variant of --ablate-base per value (repeatable)")
    parser.add_argument("--ablate-base", default="s2moe", help="the variant --ablate changes (default: s2moe)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a field for every variant whose block kind or router has it (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="(default: 1 2 3)")
    parser.add_argument("--preset", default="tiny", help="(default: tiny)")
    parser.add_argument("--max-steps", type=int, default=2000, help="(default: 2000)")
    parser.add_argument("--evals", type=int, default=10, help="validation points along training (default: 10)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run; ep_size = nproc (default: 2)")
    parser.add_argument("--deepspeed-config", default=None,
                        help="(default: the repository's ds_configs/zero2.json)")
    parser.add_argument("--out", default=None, help="(default: the repository's runs/compare)")
    parser.add_argument("--reference", default="smoe",
                        help="variant whose 2-expert score the table compares with (default: smoe)")
    parser.add_argument("--name", default="results", help="report files OUT/NAME.md, NAME.json, NAME_curves.png; "
                        "runs are shared by every report in OUT (default: results)")
    return parser


def study_parser(width: Optional[int] = None) -> argparse.ArgumentParser:
    from .experiments.study import study_parser as build  # the study's own module holds its flags
    return build(width)


SCRIPTS = {"launch/pretrain.py": pretrain_parser, "launch/finetune.py": finetune_parser,
           "launch/evaluate.py": evaluate_parser,
           "launch/compare.py": compare_parser, "launch/generate.py": generate_parser,
           "launch/consolidate.py": consolidate_parser, "launch/study.py": study_parser}


def reference_markdown(width: int = 100) -> str:
    """docs/cli.md: every launch script's --help, at a fixed width."""
    parts = ["# Command-line reference\n",
             "Generated from each script's `--help` by `python -m s2moe_ds.cli docs/cli.md`; a test keeps",
             "this file equal to what the code prints. The flags of `launch/pretrain.py`, `launch/finetune.py`",
             "and `launch/evaluate.py` come from the config dataclasses: one flag `--SECTION.KEY` per field, its",
             "docstring as the help, one group per section (`--help SECTION` prints one). Each field's plain",
             "name (`--noise-scale`, `--ep-size`, `--xmoe-dim`), the spelling of earlier command lines, still",
             "works where one section owns it.\n"]
    for script, build in SCRIPTS.items():
        parts.append(f"## {script}\n\n```text\n{build(width).format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m s2moe_ds.cli docs/cli.md", file=sys.stderr)
        return 2
    from .fileio import atomic_write_text
    atomic_write_text(args[0], reference_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
