"""The command lines of launch/*.py, generated from the config dataclasses: one flag per field.

A field `noise_scale` becomes `--noise-scale`, its docstring the flag's help, grouped by the config
it belongs to. Flags default to "not given", so presets and the dataclass defaults apply unless the
user overrides them. `python -m s2moe_ds.cli docs/cli.md` writes every script's --help there.
"""

import argparse
import ast
import functools
import inspect
import textwrap
from dataclasses import MISSING, fields
from typing import Any, Dict, Iterable, List, Optional


NESTED = ("moe", "block_config", "router_config", "backbone_config")
"""Fields that hold another config, which gets flags of its own."""


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


def add_config_args(parser: argparse.ArgumentParser, cls, title: str, skip: Iterable[str] = (),
                    defaults: Any = None, note: str = "") -> None:
    """One flag per field of `cls`, in a group titled `title`, the field's docstring as its help.
    The default shown is the field's in `defaults` (a preset's instance) or the dataclass's."""
    summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    group = parser.add_argument_group(title, " ".join(p for p in (summary, note) if p) or None)
    docs = field_docs(cls)
    for f in fields(cls):
        if f.name in skip or f.name in NESTED:
            continue
        default = getattr(defaults, f.name) if defaults is not None else f.default if f.default is not MISSING else None
        flag = "--" + f.name.replace("_", "-")
        help_text = (docs.get(f.name, "") + f" (default: {default})").strip().replace("%", "%%")
        kind = _parser_type(f.type)
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
        if f.name not in skip and f.name not in NESTED and value is not None:
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def _parser(prog: str, description: str, width: Optional[int], usage: Optional[str] = None) -> argparse.ArgumentParser:
    formatter = functools.partial(argparse.RawDescriptionHelpFormatter, width=width) if width else \
        argparse.RawDescriptionHelpFormatter
    return argparse.ArgumentParser(prog=prog, usage=usage, description=textwrap.dedent(description).strip(),
                                   formatter_class=formatter)


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


def pretrain_parser(width: Optional[int] = None) -> argparse.ArgumentParser:
    import deepspeed

    from .data import DataConfig
    from .models import BACKBONES, ModelConfig
    from .moe import BLOCKS, ROUTERS, MoEConfig
    from .parallel import ParallelConfig
    from .train import PRESETS, TrainConfig
    from .train.presets import PROTOCOLS
    parser = _parser("launch/pretrain.py", PRETRAIN, width,
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
    model = PRESETS["tiny"]().model
    note = "Defaults shown are the tiny preset's."
    add_config_args(parser, ModelConfig, "model", skip=("vocab_size", ), defaults=model, note=note)
    for name, spec in BACKBONES.items():
        if spec.settings is not None:
            add_config_args(parser, spec.settings, f"backbone {name!r} (with --backbone {name})")
    add_config_args(parser, MoEConfig, "moe: the feed-forward blocks", defaults=model.moe, note=note)
    for name, spec in BLOCKS.items():
        if spec.config is not None:
            add_config_args(parser, spec.config, f"block {name!r} (with --block {name})")
    for name, spec in ROUTERS.items():
        if spec.config is not None:
            add_config_args(parser, spec.config, f"router {name!r} (with --router {name})")
    add_config_args(parser, ParallelConfig, "parallel layout")
    add_config_args(parser, DataConfig, "data")
    add_config_args(parser, TrainConfig, "training")
    return deepspeed.add_config_arguments(parser)


def experiment_from_args(ns: argparse.Namespace):
    """The ExperimentConfig launch/pretrain.py's flags describe: the preset with the given fields."""
    from .config import ConfigError
    from .data import DataConfig
    from .models import BACKBONES, ModelConfig
    from .moe import MoEConfig
    from .moe.config import SETTINGS, nest_settings
    from .parallel import ParallelConfig
    from .train import PRESETS, TrainConfig, apply_overrides
    from .train.presets import apply_protocol
    experiment = apply_protocol(PRESETS[ns.preset](), ns.protocol)
    flat = given(ns, MoEConfig)
    for _, registry, _ in SETTINGS:
        for spec in registry.values():
            if spec.config is not None:
                flat.update(given(ns, spec.config))
    base = experiment.model.moe
    moe = nest_settings(flat, flat.get("block", base.block), flat.get("router", base.router),
                        label=lambda name: "--" + name.replace("_", "-"))
    model = given(ns, ModelConfig, skip=("vocab_size", ))
    backbone = model.get("backbone", experiment.model.backbone)
    for name, spec in BACKBONES.items():
        settings = given(ns, spec.settings) if spec.settings is not None else {}
        if settings and name != backbone:
            flag = "--" + next(iter(settings)).replace("_", "-")
            raise ConfigError(f"{flag}: is a setting of backbone {name!r}, but this run's model.backbone is "
                              f"{backbone!r}; drop it or pass --backbone {name}")
        if settings:
            model["backbone_config"] = settings
    overrides = {"model": {**model, "moe": moe},
                 "parallel": given(ns, ParallelConfig), "data": given(ns, DataConfig), "train": given(ns, TrainConfig)}
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


def finetune_parser(width: Optional[int] = None) -> argparse.ArgumentParser:
    import deepspeed

    from .data import ClassificationDataConfig
    from .parallel import ParallelConfig
    from .train import TrainConfig
    from .train.finetune import FinetuneConfig
    parser = _parser("launch/finetune.py", FINETUNE, width,
                     usage="[deepspeed|torchrun|mpirun ...] launch/finetune.py --deepspeed_config FILE "
                           "--pretrained CKPT [flags]")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a moe field of the pretrained model for fine-tuning, e.g. "
                             "uncertainty_coef=0 or balance_coef=0 (repeatable)")
    add_config_args(parser, FinetuneConfig, "fine-tuning", skip=("data", "moe_overrides"))
    add_config_args(parser, ClassificationDataConfig, "classification data")
    add_config_args(parser, ParallelConfig, "parallel layout")
    add_config_args(parser, TrainConfig, "training", skip=("seq_len", ),
                    note="out_dir defaults to runs/finetune; texts are at most the model's max_seq_len.")
    return deepspeed.add_config_arguments(parser)


def finetune_from_args(ns: argparse.Namespace):
    """(FinetuneConfig, ExperimentConfig) of launch/finetune.py's flags."""
    from .config import ConfigError
    from .data import ClassificationDataConfig
    from .experiments.compare import parse_assignment
    from .parallel import ParallelConfig
    from .train import TrainConfig
    from .train.finetune import FinetuneConfig, finetune_experiment
    overrides = {}
    for spec in ns.set:
        key, values = parse_assignment(spec, "--set")
        if len(values) != 1:
            raise ConfigError(f"--set: {spec!r} must give exactly one value")
        overrides[key] = values[0]
    cfg = FinetuneConfig(**given(ns, FinetuneConfig, skip=("data", "moe_overrides")),
                         data=ClassificationDataConfig(**given(ns, ClassificationDataConfig)), moe_overrides=overrides)
    return cfg, finetune_experiment(cfg, given(ns, ParallelConfig), given(ns, TrainConfig, skip=("seq_len", )))


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


def evaluate_parser(width: Optional[int] = None) -> argparse.ArgumentParser:
    from .data import DataConfig
    from .eval.evaluate import EvalConfig
    parser = _parser("launch/evaluate.py", EVALUATE, width)
    add_config_args(parser, EvalConfig, "evaluation", skip=("data_overrides", ))
    add_config_args(parser, DataConfig, "data (overrides of the checkpoint's data settings)")
    return parser


def eval_config_from_args(ns: argparse.Namespace):
    from .data import DataConfig
    from .eval.evaluate import EvalConfig
    return EvalConfig(**given(ns, EvalConfig, skip=("data_overrides", )), data_overrides=given(ns, DataConfig))


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
    data.add_argument("--dataset", help="embedded | enwik8 | text8 | wikitext-103")
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


SCRIPTS = {"launch/pretrain.py": pretrain_parser, "launch/finetune.py": finetune_parser,
           "launch/evaluate.py": evaluate_parser,
           "launch/compare.py": compare_parser, "launch/generate.py": generate_parser,
           "launch/consolidate.py": consolidate_parser}


def reference_markdown(width: int = 100) -> str:
    """docs/cli.md: every launch script's --help, at a fixed width."""
    parts = ["# Command-line reference\n",
             "Generated from each script's `--help` by `python -m s2moe_ds.cli docs/cli.md`; a test keeps",
             "this file equal to what the code prints. The flags of `launch/pretrain.py` come from the config",
             "dataclasses (one flag per field, its docstring as the help).\n"]
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
