"""Evaluate a checkpoint: full passes over valid and test with each eval_k, next to the FLOPs cost.

The checkpoint is consolidated to one process (s2moe_ds.checkpoint), so any training layout (ZeRO
stage, process count, ep_size) evaluates the same way, and every number except the timings is
identical from run to run: fixed windows in order, no sampling, no token drops, no noise.
"""

import json
import os
import shlex
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..checkpoint import consolidate, model_config_for_inference, model_from_state, resolve_checkpoint
from ..checkpoint.store import TOKENIZER
from ..config import ConfigError, check_int, check_known_fields, check_optional_int, require
from ..data import DataConfig, check_tokenizer_matches, prepare_corpus
from ..data.config import TOKENIZER_KINDS, check_output_folder
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


def default_out_dir(step_dir: str) -> str:
    parent = os.path.dirname(os.path.abspath(step_dir))
    run_dir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent
    return os.path.join(run_dir, "eval", os.path.basename(os.path.abspath(step_dir)))


def run_folder(step_dir: str) -> str:
    """The run folder holding checkpoints/step..., or a lone step folder itself: the files the user
    handed over, and so the only place a path recorded in the checkpoint may point to."""
    step = os.path.abspath(step_dir)
    parent = os.path.dirname(step)
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else step


def _inside(path: object, folder: str) -> bool:
    if not isinstance(path, str) or not path:
        return False
    real, root = os.path.realpath(os.path.expanduser(path)), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


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
        raise ConfigError(f"data.{next(iter(outside))}: the checkpoint records {recorded_text}, outside its run "
                          f"folder {run_dir}; not opened (a checkpoint's settings could name any file): pass "
                          f"{flags} to evaluate on it{hub}")
    tokenizer = settings.get("tokenizer")
    if ("tokenizer" not in overrides and isinstance(tokenizer, str) and tokenizer not in TOKENIZER_KINDS
            and not _inside(tokenizer, run_dir)):
        settings["tokenizer"] = os.path.join(step_dir, TOKENIZER)
        log(f"note: the checkpoint records data.tokenizer={tokenizer!r}, outside its run folder; it was not opened: "
            f"using the checkpoint's own {settings['tokenizer']} (pass --tokenizer {shlex.quote(tokenizer)} to use "
            "that file)")
    cache = settings.get("cache_dir")
    if "cache_dir" not in overrides and cache is not None and not _inside(cache, run_dir):
        default = DataConfig.cache_dir
        settings["cache_dir"] = default
        if not (isinstance(cache, str) and os.path.abspath(os.path.expanduser(cache))
                == os.path.abspath(os.path.expanduser(default))):
            log(f"note: the checkpoint records data.cache_dir={cache!r}, outside its run folder; it was not used: "
                f"tokenized splits go to {default} (pass --cache-dir {shlex.quote(str(cache))} to use that folder)")
    return {**settings, **overrides}


def evaluate_checkpoint(cfg: EvalConfig, log=print) -> Dict[str, object]:
    """Evaluate, write <out_dir>/eval.json (and the analysis files), and return the report."""
    step_dir = resolve_checkpoint(cfg.checkpoint)
    out_dir = cfg.out_dir or default_out_dir(step_dir)
    if cfg.out_dir is None:  # a given one was checked with the flags
        check_output_folder(out_dir, "eval.out_dir", "--out-dir")
    state, client = consolidate(step_dir)
    run = client.get("run") or {}
    if "data" not in run or "train" not in run:
        raise ConfigError(f"eval.checkpoint: {step_dir} records no run settings (client state 'run'); "
                          "it was not written by s2moe_ds.train")
    model_cfg = model_config_for_inference(client, state=state, where=f"--checkpoint: {_states_file(step_dir)}")
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
    models = {}
    for k in ks:
        models[k] = model_from_state(state, client, k, f"--checkpoint: {_states_file(step_dir)}").to(device)
        flops = report["flops_per_token"][str(k)]["total"]
        for split in cfg.splits:
            start = time.perf_counter()
            result = _run_split(cfg, corpus, split, seq_len, device, models[k])
            seconds = time.perf_counter() - start
            row = {"split": split, "eval_k": k, **result, "seconds": seconds,
                   "tokens_per_s": result["tokens"] / seconds, "flops_per_token": flops,
                   "flops_vs_largest_k": flops / reference_flops}
            report["results"].append(row)
            log(format_row(row, corpus.metric))
    if cfg.analysis and routed:
        # Its own pass, so the hooks cost nothing in the timed ones.
        k, split = ks[0], cfg.splits[0]
        analyzer = ExpertAnalyzer(models[k], cfg.analysis_tokens, corpus.tokenizer.vocab_size)
        with analyzer:
            _run_split(cfg, corpus, split, seq_len, device, models[k], analyzer)
        report["analysis"] = _write_analysis(analyzer, corpus.tokenizer, out_dir, client.get("step") or 0, split, k)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "eval.json"), json.dumps(report, indent=2) + "\n")
    report["out_dir"] = out_dir
    return report


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
