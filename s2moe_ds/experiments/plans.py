"""Named study plans: which runs make up a study, each a cell with its own flags.

A plan is the product of backbones x corpora x variants x seeds for pretraining, and, for the
fine-tuning tasks, one fine-tuning run per pretrained (variant, seed) of one corpus. `paper` is
the paper's study (docs/method.md, "What is known of the paper's setup"): Transformer-XL base
(and, on request, its GPT counterpart paper-small) for 100k steps on enwik8, text8,
WikiText-103 and One Billion Word at their global batches (44, 44, 22, 11), the five methods and
S2MoE over each baseline's router, then SST-2, SST-5, IMDB and BANKING77, each evaluated with 1
and 2 experts per token. Scale `tiny` is the same grid at CPU size: the tiny presets, a few steps,
every corpus replaced by the embedded one and every task by a two-class stand-in written from it.
"""

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import ConfigError
from .compare import Variant, plan_variants
from .runner import pretrain_flags

PAPER_VARIANTS = ("smoe", "smoe-dropout", "xmoe", "stablemoe", "s2moe",
                  "s2moe-xmoe", "s2moe-stablemoe", "s2moe-smoe-dropout")
"""The paper's five methods, then S2MoE over each baseline's router (s2moe is S2MoE over SMoE's)."""

ONE_BILLION_WORD_NAMES = ("one-billion-word", "lm1b", "one_billion_word")
"""What the data package may call One Billion Word; the plan uses the first it knows."""

PAPER_TASKS = ("sst2", "sst5", "imdb", "banking77")
BACKBONE_PRESETS = {"paper": {"txl": "txl-base", "gpt": "paper-small"}, "tiny": {"txl": "txl-tiny", "gpt": "tiny"}}
SCALES = tuple(BACKBONE_PRESETS)


@dataclass(frozen=True)
class Corpus:
    """One pretraining corpus of a plan: its plan name, the data.dataset that reads it (None:
    not available in this installation, skipped with `note`), and the paper's global batch."""
    name: str
    dataset: Optional[str]
    batch: int
    note: str = ""


def _one_billion_word() -> Corpus:
    from ..data.config import DATASETS
    known = [n for n in ONE_BILLION_WORD_NAMES if n in DATASETS]
    if known:
        return Corpus("one-billion-word", known[0], 11)
    return Corpus("one-billion-word", None, 11, "One Billion Word is not a dataset of s2moe_ds.data yet (data.dataset "
                                    f"choices: {', '.join(DATASETS)}): skipped until it is")


def paper_corpora() -> Tuple[Corpus, ...]:
    return (Corpus("enwik8", "enwik8", 44), Corpus("text8", "text8", 44), Corpus("wikitext-103", "wikitext-103", 22),
            _one_billion_word())


@dataclass(frozen=True)
class Resources:
    """What each job asks SLURM for; passed through to sbatch."""
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: Optional[int] = None
    """Processes per node (default: gpus_per_node, or 1 without GPUs); lowered per corpus to divide
    its global batch on one node."""
    cpus_per_task: int = 8
    time: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    sbatch: Tuple[str, ...] = ()

    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    def tasks_for_batch(self, batch: Optional[int], where: str) -> int:
        """Tasks per node for a job whose global batch is `batch`: all of them when they divide it;
        on one node the largest count that does (44 on 8 GPUs: 4)."""
        tasks = self.tasks()
        if batch is None or batch % (tasks * self.nodes) == 0:
            return tasks
        if self.nodes == 1:
            return math.gcd(batch, tasks)
        raise ConfigError(f"--nodes/--tasks-per-node: {self.nodes} x {tasks} processes do not divide {where}'s "
                          f"global batch {batch}; choose --nodes 1 or a process count that divides it")

    def sbatch_args(self, tasks: int) -> List[str]:
        out = ["--nodes", str(self.nodes), "--ntasks-per-node", str(tasks), "--cpus-per-task", str(self.cpus_per_task)]
        if self.gpus_per_node > 0:
            out += ["--gpus-per-node", str(tasks)]
        for flag, value in (("--time", self.time), ("--partition", self.partition), ("--account", self.account)):
            if value:
                out += [flag, value]
        return out + list(self.sbatch)


@dataclass(frozen=True)
class Cell:
    """One run of a study: one SLURM job running slurm/pretrain.sh (through slurm/study_cell.sh)."""
    name: str
    """Its path under the study's --out, e.g. 'txl/enwik8/smoe/seed1' or 'finetune/sst2/txl/enwik8/smoe/seed1'."""
    kind: str
    """'pretrain' or 'finetune'."""
    env: Tuple[Tuple[str, str], ...]
    """slurm/pretrain.sh's variables: SCRIPT, PRESET, DATASET, DATA_PATH, DS_CONFIG, PRETRAINED."""
    flags: Tuple[str, ...]
    """The launch script's flags after the ones slurm/pretrain.sh adds."""
    tasks: int
    """Processes per node."""
    group: Tuple[str, str] = ("", "")
    """(backbone, corpus) for pretraining, (task, 'backbone/corpus') for fine-tuning: one table each."""
    variant: str = ""
    seed: int = 0
    after: Optional[str] = None
    """The cell whose job must succeed first (a fine-tuning cell's pretraining)."""
    skipped: str = ""
    """Why the cell is not submitted (a corpus this installation lacks), or ''."""
    data: Tuple[Tuple[str, str], ...] = ()
    """DataConfig fields its evaluation reads the corpus with."""

    def command(self) -> List[str]:
        """What the cell's run folder records: the script's variables, then its flags."""
        return [f"{k}={v}" for k, v in self.env] + list(self.flags)


@dataclass
class Plan:
    name: str
    scale: str
    backbones: Tuple[str, ...]
    corpora: Tuple[Corpus, ...]
    variants: List[Variant]
    seeds: Tuple[int, ...]
    tasks: Tuple[str, ...]
    finetune_from: str
    max_steps: int
    evals: int
    finetune_steps: Optional[int]
    resources: Resources
    out: str
    data_paths: Dict[str, str] = field(default_factory=dict)
    task_paths: Dict[str, str] = field(default_factory=dict)
    extra: Tuple[str, ...] = ()
    finetune_extra: Tuple[str, ...] = ()
    notes: List[str] = field(default_factory=list)

    def cells(self) -> List[Cell]:
        """Every cell: pretraining (backbone, corpus, variant, seed), then fine-tuning."""
        return [*self.pretrain_cells(), *self.finetune_cells()]

    def pretrain_cells(self) -> List[Cell]:
        out = []
        for backbone in self.backbones:
            preset = BACKBONE_PRESETS[self.scale][backbone]
            for corpus in self.corpora:
                tasks = self.resources.tasks_for_batch(corpus.batch if self.scale == "paper" else None, corpus.name)
                env, data_flags, data = self._corpus_env(corpus, preset)
                for v in self.variants:
                    for seed in self.seeds:
                        flags = pretrain_flags(v, seed, preset, data_flags, self.max_steps, self.evals,
                                               [*self._backbone_extra(backbone), *self.extra])
                        out.append(Cell(f"{backbone}/{corpus.name}/{v.slug}/seed{seed}", "pretrain", env, tuple(flags),
                                        tasks, (backbone, corpus.name), v.name, seed, None,
                                        corpus.note if self.scale == "paper" else "", data))
        return out

    def finetune_cells(self) -> List[Cell]:
        out = []
        corpus = next((c for c in self.corpora if c.name == self.finetune_from), None)
        if corpus is None or not self.tasks:
            return out
        pretrained = {(c.group, c.variant, c.seed): c for c in self.pretrain_cells()}
        for task in self.tasks:
            for backbone in self.backbones:
                for v in self.variants:
                    for seed in self.seeds:
                        source = pretrained[((backbone, corpus.name), v.name, seed)]
                        env = [("SCRIPT", "launch/finetune.py"), ("PRETRAINED", self.folder(source))]
                        dataset, path = self._task_data(task)
                        env += [("DATASET", dataset)] + ([("DATA_PATH", path)] if path else [])
                        flags = ["--seed", str(seed), "--eval-k", "1", "2"]
                        if self.finetune_steps:
                            flags += ["--max-steps", str(self.finetune_steps),
                                      "--eval-interval", str(max(self.finetune_steps // 2, 1))]
                        out.append(Cell(f"finetune/{task}/{source.name}", "finetune", tuple(env),
                                        tuple(flags + list(self.finetune_extra)), self.resources.tasks(),
                                        (task, f"{backbone}/{corpus.name}"), v.name, seed, source.name,
                                        source.skipped))
        return out

    def folder(self, cell: Cell) -> str:
        return os.path.join(os.path.abspath(self.out), cell.name)

    def _corpus_env(self, corpus: Corpus, preset: str):
        env = [("SCRIPT", "launch/pretrain.py"), ("PRESET", preset)]
        path = self.data_paths.get(corpus.name)
        if self.scale == "tiny":  # the embedded corpus, or a small text file standing in for this corpus
            if path:
                return (tuple(env + [("DATASET", "path"), ("DATA_PATH", path)]), ["--dataset", "path", "--path", path],
                        (("path", path),))
            return tuple(env + [("DATASET", "embedded")]), ["--dataset", "embedded"], ()
        dataset = corpus.dataset or corpus.name
        env += [("DATASET", dataset), ("DS_CONFIG", self.batch_config(corpus.batch))]
        flags = ["--dataset", dataset] + (["--path", path] if path else [])
        return tuple(env + ([("DATA_PATH", path)] if path else [])), flags, ((("path", path),) if path else ())

    def _backbone_extra(self, backbone: str) -> List[str]:
        # paper-small is the GPT counterpart of txl-base's model; at paper scale it also trains as
        # txl-base does (segments of 512, Adam at 3.5e-4, cosine to zero without warmup).
        if self.scale == "paper" and backbone == "gpt":
            return ["--seq-len", "512", "--lr", "0.00035", "--warmup-steps", "0", "--min-lr-ratio", "0"]
        return []

    def _task_data(self, task: str) -> Tuple[str, Optional[str]]:
        if self.scale == "tiny":
            return "files", self.task_paths.get(task) or os.path.join(os.path.abspath(self.out), "tiny_task")
        return task, self.task_paths.get(task)

    def batch_config(self, batch: int) -> str:
        """The DeepSpeed config of a corpus: ds_configs/txl_base.json at the corpus's global batch,
        written under the study's --out (the run records the path)."""
        return os.path.join(os.path.abspath(self.out), "ds_configs", f"txl_base_batch{batch}.json")

    def write_configs(self, root: str) -> None:
        """The per-corpus DeepSpeed configs, and at tiny scale the stand-in task's files."""
        from ..fileio import atomic_write_text
        if self.scale == "paper":
            with open(os.path.join(root, "ds_configs", "txl_base.json")) as f:
                base = json.load(f)
            for corpus in self.corpora:
                os.makedirs(os.path.dirname(self.batch_config(corpus.batch)), exist_ok=True)
                atomic_write_text(self.batch_config(corpus.batch),
                                  json.dumps({**base, "train_batch_size": corpus.batch}, indent=2) + "\n")
        elif self.tasks:
            write_tiny_task(os.path.join(os.path.abspath(self.out), "tiny_task"))


def write_tiny_task(folder: str, n: int = 160) -> None:
    """The tiny scale's stand-in for the fine-tuning tasks, from the embedded corpus: paragraphs
    labelled by whether they mention 'class' (a task a tiny model can start to learn)."""
    from ..data.corpora import embedded_text
    from ..fileio import atomic_write_text
    paragraphs = [p.strip() for p in embedded_text().split("\n\n") if 40 <= len(p.strip()) <= 300][:n]
    rows = [{"text": p, "label": int("class" in p)} for p in paragraphs]
    os.makedirs(folder, exist_ok=True)
    cut = {"train": rows[: n * 3 // 4], "valid": rows[n * 3 // 4: n * 7 // 8], "test": rows[n * 7 // 8:]}
    for split, part in cut.items():
        atomic_write_text(os.path.join(folder, f"{split}.jsonl"), "".join(json.dumps(r) + "\n" for r in part))


def _pick(chosen: Optional[Sequence[str]], known: Sequence[str], flag: str) -> Tuple[str, ...]:
    if chosen is None:
        return tuple(known)
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise ConfigError(f"{flag}: unknown {', '.join(map(repr, unknown))}; the plan has {', '.join(known)}")
    return tuple(chosen)


def _pairs(specs: Sequence[str], flag: str, known: Sequence[str]) -> Dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ConfigError(f"{flag}: {spec!r} is not NAME=PATH, e.g. enwik8=/data/enwik8")
        if name not in known:
            raise ConfigError(f"{flag}: unknown name {name!r}; choose from {', '.join(known)}")
        out[name] = os.path.abspath(path)
    return out


def paper_plan(out: str, scale: str = "paper", seeds: Sequence[int] = (1, 2, 3),
               backbones: Optional[Sequence[str]] = None, corpora: Optional[Sequence[str]] = None,
               variants: Optional[Sequence[str]] = None, tasks: Optional[Sequence[str]] = None,
               finetune_from: str = "enwik8", max_steps: Optional[int] = None, resources: Resources = Resources(),
               data_paths: Sequence[str] = (), task_paths: Sequence[str] = (), extra: Sequence[str] = (),
               finetune_steps: Optional[int] = None) -> Plan:
    """The paper's study (module docstring), or a part of it: each selection narrows one axis."""
    if scale not in SCALES:
        raise ConfigError(f"--scale: unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: {list(seeds)} must be distinct integers >= 0, at least one")
    all_corpora = paper_corpora()
    names = _pick(corpora, [c.name for c in all_corpora], "--corpora")
    chosen = tuple(c for c in all_corpora if c.name in names)
    backbones = _pick(backbones, ("txl",) if backbones is None else tuple(BACKBONE_PRESETS[scale]), "--backbones")
    if finetune_from not in names:
        raise ConfigError(f"--finetune-from: {finetune_from!r} is not a corpus of this plan ({', '.join(names)})")
    steps = max_steps if max_steps is not None else (100_000 if scale == "paper" else 40)
    if steps < 1:
        raise ConfigError(f"--max-steps: must be >= 1, got {steps}")
    preset = BACKBONE_PRESETS[scale][backbones[0]]
    plan = Plan("paper", scale, backbones, chosen, plan_variants(_pick(variants, PAPER_VARIANTS, "--variants"),
                                                                  preset=preset),
                tuple(seeds), _pick(tasks, PAPER_TASKS, "--tasks"), finetune_from, steps,
                25 if scale == "paper" else 2, finetune_steps if finetune_steps else (None if scale == "paper" else 10),
                resources, os.path.abspath(out),
                _pairs(data_paths, "--data-path", [c.name for c in all_corpora]),
                _pairs(task_paths, "--task-path", PAPER_TASKS), tuple(extra))
    plan.notes += [f"{c.name}: {c.note}" for c in chosen if c.note and scale == "paper"]
    if scale == "tiny":
        plan.notes.append("tiny scale: every corpus is the embedded one and every task a two-class stand-in "
                          "written from it")
    return plan


PLANS = {"paper": paper_plan}
"""Named plans, each a function of the study's selections (launch/study.py --plan)."""
