"""Evaluate a checkpoint: full passes over valid and test with each eval_k, next to the FLOPs cost.

The checkpoint is consolidated to one process (s2moe_ds.checkpoint), so any training layout (ZeRO
stage, process count, ep_size) evaluates the same way, and every number except the timings is
identical from run to run: fixed windows in order, no sampling, no token drops, no noise.
"""

import contextlib
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..checkpoint import consolidate, model_config_for_inference, model_from_state, resolve_checkpoint
from ..checkpoint.output import checkpoint_folder_holding
from ..checkpoint.manifest import MANIFEST
from ..checkpoint.store import COMPLETE, LATEST, TOKENIZER, step_of_name
from ..config import ConfigError, check_int, check_known_fields, check_optional_int, require
from ..data import DataConfig, check_tokenizer_matches, prepare_corpus
from ..data.config import TOKENIZER_KINDS, check_output_folder
from ..moe import experts_per_token
from ..parallel.deepspeed_internals import MODEL_STATES
from ..fileio import atomic_write_text
from ..tables import markdown_table
from .analysis import ExpertAnalyzer, public
from .flops import flops_per_token
from .lm_eval import evaluate_lm


@dataclass
class EvalConfig:
    """What to evaluate and how; every field has a flag of the same name in launch/evaluate.py."""

    checkpoint: str = ""
    """Run folder, its checkpoints/ folder, or a step folder."""
    eval_k: Sequence[int] = (1, 2)
    """Experts per token to evaluate with, each in its own full pass (ignored for a dense model)."""
    splits: Sequence[str] = ("valid", "test")
    """Splits to evaluate: train | valid | test."""
    seq_len: Optional[int] = None
    """Window length; None uses the checkpoint's training seq_len."""
    batch_size: int = 16
    """Windows per forward (affects speed only: eval never drops tokens); a backbone with memory
    reads model.backbone_config.eval_streams streams instead."""
    max_batches: Optional[int] = None
    """Cap on batches per split (None: the full split). Capped results are not comparable to full ones."""
    analysis: bool = False
    """Also analyse what the experts learned (analysis.py) on the first split, with the first eval_k."""
    analysis_tokens: int = 4096
    """Tokens in the fixed sample used for expert similarity, effective rank and g(x)."""
    out_dir: Optional[str] = None
    """Where the JSON report, plots and TensorBoard events go; None: <run folder>/eval/step<N>."""
    data_overrides: Dict[str, object] = field(default_factory=dict)
    """DataConfig fields that replace the checkpoint's (e.g. path or cache_dir on another machine)."""

    def __post_init__(self) -> None:
        require(isinstance(self.checkpoint, str) and self.checkpoint != "", "eval.checkpoint",
                 "required: a run folder, its checkpoints/ folder or a step folder")
        self.eval_k = tuple(self.eval_k)
        require(len(self.eval_k) > 0, "eval.eval_k", "give at least one value, e.g. --eval-k 1 2")
        for k in self.eval_k:
            check_int(k, "eval.eval_k", 1)
        self.splits = tuple(self.splits)
        require(len(self.splits) > 0, "eval.splits", "give at least one of train, valid, test")
        for s in self.splits:
            require(s in ("train", "valid", "test"), "eval.splits", f"unknown split {s!r}; use train, valid or test")
        check_optional_int(self.seq_len, "eval.seq_len", 1)
        check_int(self.batch_size, "eval.batch_size", 1)
        check_optional_int(self.max_batches, "eval.max_batches", 1)
        check_int(self.analysis_tokens, "eval.analysis_tokens", 2)
        if self.out_dir is not None:
            check_output_folder(self.out_dir, "eval.out_dir", "--out-dir")


RUN_CONFIG = "run_config.json"
"""What the trainer writes in its run folder at start (train/trainer.py): the mark of a run folder."""


def _out_base(step_dir: str) -> str:
    """The folder the default out-dir goes in: the one holding checkpoints/, else the step folder's."""
    parent = os.path.dirname(os.path.abspath(step_dir))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent


def default_out_dir(step_dir: str) -> str:
    return os.path.join(_out_base(step_dir), "eval", os.path.basename(os.path.abspath(step_dir)))


def run_folder(step_dir: str) -> str:
    """The files the user handed over, and so the only place a path recorded in the checkpoint may
    point to: the folder holding checkpoints/step... when it also holds the run_config.json its
    trainer wrote, else the step folder alone (a checkpoints/ tree unpacked into a home folder
    must not make all of it the run's)."""
    step = os.path.abspath(step_dir)
    parent = os.path.dirname(step)
    if os.path.basename(parent) == "checkpoints":
        run_config = os.path.join(os.path.dirname(parent), RUN_CONFIG)
        if os.path.isfile(run_config) and not os.path.islink(run_config):
            return os.path.dirname(parent)
    return step


def _outside_reason(path: object, folder: str) -> Optional[str]:
    """Why a recorded path is not one of the run's (None: it lies inside `folder`)."""
    if not isinstance(path, str) or not path:
        return f"outside its run folder {folder}"
    path = os.path.expanduser(path)
    if not os.path.isabs(path):  # it would resolve against whatever folder evaluate runs in
        return f"a relative path, which names no folder of the run {folder}"
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return None if os.path.commonpath([real, root]) == root else f"outside its run folder {folder}"


def _inside(path: object, folder: str) -> bool:
    return _outside_reason(path, folder) is None


def check_out_dir(out_dir: str, checkpoint: str, step_dir: str, given: bool, subfolders: Sequence[str] = ()) -> None:
    """Refuse an out-dir that would write through a symbolic link a received run folder may hold
    (`eval` -> anywhere) or into a checkpoint: checked before the weights are read and again before
    writing. `subfolders`: the folders of out_dir that will be written (plots, tensorboard)."""
    what = f"--out-dir {out_dir}" if given else f"the default out-dir {out_dir}"
    _check_no_links(out_dir, _out_base(step_dir) if not given else run_folder(step_dir), given, subfolders, what)
    folder = checkpoint_folder_holding(_first_not_ours(out_dir), checkpoint)
    if folder is not None:
        raise ConfigError(f"eval.out_dir: {what} is inside the checkpoint folder {folder}; evaluate never writes "
                          "into checkpoints (a file there fails the step's manifest, and a resume skips that step): "
                          "pass --out-dir a folder outside checkpoints/, e.g. the run folder's eval/")


def _check_no_links(out_dir: str, root: str, given: bool, subfolders: Sequence[str], what: str) -> None:
    """No symbolic link below `root` (the received folder) on the way to out_dir or its subfolders;
    a default out-dir must also resolve inside it. A given out-dir outside the run is the user's own
    folder, links and all."""
    path = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.commonpath([path, root]) != root:
        return
    for folder in [*_folders_between(root, path), *(os.path.join(path, s) for s in subfolders)]:
        if os.path.islink(folder):
            raise ConfigError(f"eval.out_dir: {folder} is a symbolic link (to {os.readlink(folder)!r}) in the "
                              f"checkpoint's folder {root}, on the way to {what}; evaluate does not write through "
                              "a link a received folder may hold: pass --out-dir a folder of your own (or remove the "
                              "link if you made it)")
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    real, real_root = os.path.realpath(existing), os.path.realpath(root)
    if not given and os.path.commonpath([real, real_root]) != real_root:
        raise ConfigError(f"eval.out_dir: {what} resolves to {real}, outside {root}: pass --out-dir a folder of "
                          "your own")


def _holds_checkpoint_files(folder: str) -> bool:
    try:
        names = os.listdir(folder)
    except OSError:
        return True  # unknown: not ours
    return any(n in (MANIFEST, COMPLETE, LATEST) or n.endswith(".pt") for n in names)


def _ours(folder: str) -> bool:
    """Whether `folder` is evaluate's to write: one still to be made, a step-named folder holding no
    checkpoint file (an earlier <run>/eval/step<N>), or an eval/ folder holding only such. The name
    rule of the checkpoint check would take these for step and checkpoints/ folders."""
    if not os.path.lexists(folder):
        return True
    if not os.path.isdir(folder) or os.path.islink(folder) or _holds_checkpoint_files(folder):
        return False
    if step_of_name(os.path.basename(folder)) is not None:
        return True
    steps = [os.path.join(folder, d) for d in os.listdir(folder) if step_of_name(d) is not None]
    return os.path.basename(folder) != "checkpoints" and bool(steps) and all(_ours(d) for d in steps)


def _first_not_ours(out_dir: str) -> str:
    """out_dir less its trailing folders that evaluate makes or made: what the checkpoint check judges."""
    path = os.path.abspath(os.path.expanduser(out_dir))
    while _ours(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _folders_between(root: str, path: str) -> List[str]:
    """The folders below `root` down to `path` itself, outermost first."""
    folders, current = [], root
    for part in os.path.relpath(path, root).split(os.sep):
        if part not in ("", "."):
            current = os.path.join(current, part)
            folders.append(current)
    return folders


SOURCE_FIELDS = ("path", "train_file", "valid_file", "test_file")


def data_settings(recorded: object, overrides: Dict[str, object], step_dir: str, log=print) -> Dict[str, object]:
    """The DataConfig fields to evaluate with: the user's data flags over the checkpoint's settings.

    A checkpoint may come from anyone, and its settings could name any file the user can read, or
    a cache folder anywhere: a recorded local path is used only inside the run folder. Outside it,
    the corpus (data.path and the split files) is refused, naming the flag that passes it; the
    tokenizer becomes the step folder's own tokenizer.json (the same ids, checked after) and the
    cache folder DataConfig's default. Dataset names (the hub's) are no local paths and are kept.
    Giving --dataset or any corpus flag replaces all of the recorded corpus location."""
    where = f"--checkpoint: {step_dir}"
    if not isinstance(recorded, dict):
        raise ConfigError(f"{where}: its data settings (client state run.data) are not a dict of DataConfig "
                          "fields; the checkpoint was altered")
    check_known_fields(recorded, DataConfig, "data", f"the data settings {where} records")
    run_dir = run_folder(step_dir)
    settings = dict(recorded)
    if any(f in overrides for f in ("dataset", *SOURCE_FIELDS)):
        for f in SOURCE_FIELDS:
            settings.pop(f, None)
    outside = {f: settings[f] for f in SOURCE_FIELDS
               if settings.get(f) is not None and f not in overrides and not _inside(settings[f], run_dir)}
    if outside:
        recorded_text = ", ".join(f"data.{f}={v!r}" for f, v in outside.items())
        flags = " ".join(f"--{f.replace('_', '-')} {shlex.quote(str(v))}" for f, v in outside.items())
        hub = (f", or --dataset {settings['dataset']} for the hub's copy" if settings.get("dataset") not in
               ("path", "embedded", None) else "")
        reason = _outside_reason(next(iter(outside.values())), run_dir)
        raise ConfigError(f"data.{next(iter(outside))}: the checkpoint records {recorded_text}, {reason}; not "
                          f"opened (a checkpoint's settings could name any file): pass {flags} to evaluate on it{hub}")
    _choose_tokenizer(settings, overrides, step_dir, run_dir, log)
    cache = settings.get("cache_dir")
    if "cache_dir" not in overrides and cache is not None and not _inside(cache, run_dir):
        default = DataConfig.cache_dir
        settings["cache_dir"] = default
        if not (isinstance(cache, str) and os.path.abspath(os.path.expanduser(cache))
                == os.path.abspath(os.path.expanduser(default))):
            log(f"note: the checkpoint records data.cache_dir={cache!r}, {_outside_reason(cache, run_dir)}; it was "
                f"not used: tokenized splits go to {default} (pass --cache-dir {shlex.quote(str(cache))} to use that "
                "folder)")
    return {**settings, **overrides}


def _choose_tokenizer(settings: Dict[str, object], overrides: Dict[str, object], step_dir: str, run_dir: str,
                      log) -> None:
    """A recorded tokenizer file outside the run, or one inside it that is gone (the step folder
    it named was pruned), becomes the step folder's own tokenizer.json: the user never passed the
    recorded one, and the step's own gives the checkpoint's ids (checked after)."""
    tokenizer = settings.get("tokenizer")
    if "tokenizer" in overrides or not isinstance(tokenizer, str) or tokenizer in TOKENIZER_KINDS:
        return
    own = os.path.join(step_dir, TOKENIZER)
    reason = _outside_reason(tokenizer, run_dir)
    if reason is not None:
        settings["tokenizer"] = own
        log(f"note: the checkpoint records data.tokenizer={tokenizer!r}, {reason}; it was not opened: using the "
            f"checkpoint's own {own} (pass --tokenizer {shlex.quote(tokenizer)} to use that file)")
    elif not os.path.exists(os.path.expanduser(tokenizer)):
        settings["tokenizer"] = own
        log(f"note: the checkpoint records data.tokenizer={tokenizer!r}, which no longer exists (a step folder "
            f"pruned since?): using the checkpoint's own {own}")


def evaluate_checkpoint(cfg: EvalConfig, log=print) -> Dict[str, object]:
    """Evaluate, write <out_dir>/eval.json (and the analysis files), and return the report."""
    step_dir = resolve_checkpoint(cfg.checkpoint)
    out_dir = cfg.out_dir or default_out_dir(step_dir)
    subfolders = ("plots", "tensorboard") if cfg.analysis else ()
    check_out_dir(out_dir, cfg.checkpoint, step_dir, cfg.out_dir is not None, subfolders)
    if cfg.out_dir is None:  # a given one was checked with the flags
        check_output_folder(out_dir, "eval.out_dir", "--out-dir")
    state, client = consolidate(step_dir)
    run = client.get("run") or {}
    if "data" not in run or "train" not in run:
        raise ConfigError(f"eval.checkpoint: {step_dir} records no run settings (client state 'run'); "
                          "it was not written by s2moe_ds.train")
    model_cfg = model_config_for_inference(client, state=state, where=f"--checkpoint: {_states_file(step_dir)}")
    _check_eval_k(cfg.eval_k, model_cfg)
    seq_len = cfg.seq_len or run["train"]["seq_len"]
    check_int(seq_len, "eval.seq_len", 1)
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"eval.seq_len: {seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    data_cfg = DataConfig(**data_settings(run["data"], cfg.data_overrides, step_dir, log))
    corpus = prepare_corpus(data_cfg)
    check_tokenizer_matches(client["tokenizer"], corpus.tokenizer.identity(), f"checkpoint {step_dir}")
    routed = model_cfg.moe.routed
    ks: List[Optional[int]] = list(cfg.eval_k) if routed else [None]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: Dict[str, object] = {
        "checkpoint": os.path.abspath(step_dir), "step": client.get("step"),
        "block": model_cfg.moe.block, "router": model_cfg.moe.router if routed else None,
        "model": model_cfg.to_dict(), "data": corpus.identity, "metric": corpus.metric,
        "seq_len": seq_len, "batch_size": cfg.batch_size, "max_batches": cfg.max_batches,
        "trained_with": {"world_size": client.get("world_size"), "ep_size": client.get("ep_size")},
        "device": str(device),
        "flops_per_token": {str(k): flops_per_token(model_cfg, seq_len, k) for k in ks},
        "results": [], "analysis": None,
    }
    # The cost ratio printed next to each score: this eval_k's FLOPs over the largest one's.
    reference_flops = report["flops_per_token"][str(max(ks) if routed else ks[-1])]["total"]
    # One model for every eval_k, switched in place on its routers (the only place eval_k lives),
    # with the checkpoint's weights: built from them, which are then dropped.
    model = model_from_state(state, client, None, f"--checkpoint: {_states_file(step_dir)}").to(device)
    del state
    for k in ks:
        flops = report["flops_per_token"][str(k)]["total"]
        for split in cfg.splits:
            start = time.perf_counter()
            with _eval_k(model, k):
                result = _run_split(cfg, corpus, split, seq_len, device, model)
            seconds = time.perf_counter() - start
            row = {"split": split, "eval_k": k, **result, "seconds": seconds,
                   "tokens_per_s": result["tokens"] / seconds, "flops_per_token": flops,
                   "flops_vs_largest_k": flops / reference_flops}
            report["results"].append(row)
            log(format_row(row, corpus.metric))
    if cfg.analysis and routed:
        # Its own pass, so the hooks cost nothing in the timed ones.
        k, split = ks[0], cfg.splits[0]
        analyzer = ExpertAnalyzer(model, cfg.analysis_tokens, corpus.tokenizer.vocab_size)
        with _eval_k(model, k):  # the report reads each router's eval_k too
            with analyzer:
                _run_split(cfg, corpus, split, seq_len, device, model, analyzer)
            # Again before writing: a folder or link may have appeared while the model ran.
            check_out_dir(out_dir, cfg.checkpoint, step_dir, cfg.out_dir is not None, subfolders)
            report["analysis"] = _write_analysis(analyzer, corpus.tokenizer, out_dir, client.get("step") or 0,
                                                 split, k)
    check_out_dir(out_dir, cfg.checkpoint, step_dir, cfg.out_dir is not None, subfolders)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "eval.json"), json.dumps(report, indent=2) + "\n")
    report["out_dir"] = out_dir
    return report


def _check_eval_k(eval_k: Sequence[int], model_cfg) -> None:
    """Each eval_k fits the checkpoint's layers: refused before the corpus is read or a model built."""
    experts = model_cfg.moe.num_experts
    for k in eval_k if model_cfg.moe.routed else ():
        require(k <= experts, "eval.eval_k", f"{k} exceeds the checkpoint's {experts} experts per layer; pass "
                f"values from 1 to {experts}")


def _eval_k(model, k: Optional[int]):
    """Within the block, the model evaluates with k experts per token (None: a dense model, as is);
    its routers' eval_k is restored after, also on an error."""
    return contextlib.nullcontext() if k is None else experts_per_token(model, k)


def _states_file(step_dir: str) -> str:
    return os.path.join(step_dir, MODEL_STATES)


def _run_split(cfg: EvalConfig, corpus, split: str, seq_len: int, device, model,
               analyzer: Optional[ExpertAnalyzer] = None) -> Dict[str, float]:
    def forward(x, y, m, state):
        if analyzer is not None:
            analyzer.set_tokens(x, m)
        return model(x, y, m, state)
    return evaluate_lm(forward, model.cfg, corpus.splits[split], seq_len, cfg.batch_size, 0, 1, device,
                       corpus.units[split], corpus.metric, cfg.max_batches)


def _write_analysis(analyzer: ExpertAnalyzer, tokenizer, out_dir: str, step: int, split: str, k) -> Dict:
    from . import plots
    full = analyzer.report(decode=lambda i: tokenizer.decode([i]))
    full["split"], full["eval_k"] = split, k
    figures = plots.analysis_figures(full)
    try:
        paths = plots.save_figures(figures, os.path.join(out_dir, "plots"))
        plots.write_analysis_tensorboard(full, figures, os.path.join(out_dir, "tensorboard"), step)
    finally:
        plots.close_figures(figures)
    report = public(full)
    report["plots"] = [os.path.relpath(p, out_dir) for p in paths]
    atomic_write_text(os.path.join(out_dir, "analysis.json"), json.dumps(report, indent=2) + "\n")
    return report


def format_row(row: Dict, metric: str) -> str:
    value = f"{metric} {row[metric]:.4f}" if metric in row else ""
    k = "-" if row["eval_k"] is None else row["eval_k"]
    return (f"{row['split']:5s} eval_k {k}: {value}, {row['tokens_per_s']:,.0f} tokens/s, "
            f"{row['flops_per_token'] / 1e6:.2f} MFLOPs/token ({row['flops_vs_largest_k']:.2f}x the largest eval_k)")


def report_table(report: Dict) -> str:
    metric = report["metric"]
    return markdown_table(
        ["split", "eval_k", metric, "tokens/s", "MFLOPs/token", "FLOPs vs the largest eval_k"],
        [[r["split"], "-" if r["eval_k"] is None else r["eval_k"], f"{r[metric]:.4f}", f"{r['tokens_per_s']:,.0f}",
          f"{r['flops_per_token'] / 1e6:.3f}", f"{r['flops_vs_largest_k']:.3f}"] for r in report["results"]])
