"""Fine-tuning: a pretrained checkpoint (any block kind, router, backbone and training layout) with
a classification head, trained by the same Trainer as pretraining (DeepSpeed, expert parallelism,
ZeRO, checkpoints, exact resume, signals), then evaluated with each eval_k.

    final = finetune(FinetuneConfig(pretrained="runs/tiny", data=ClassificationDataConfig(...)),
                     experiment, "ds_configs/finetune.json")

The blocks train as in pretraining: S2MoE keeps its noisy path, its mixing gate and its InfoNCE
loss, and every block its balance loss, each weighted by the pretrained model's coefficients
unless `moe_overrides` changes them (e.g. uncertainty_coef 0).
"""

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Sequence


from ..checkpoint import consolidate, load_global_state, resolve_checkpoint
from ..checkpoint.compat import read_meta_file
from ..checkpoint.consolidate import check_config_fits, stored_shapes
from ..checkpoint.store import META, TOKENIZER
from ..config import ConfigError, check_choice, check_int, check_number, require
from ..data import ClassificationDataConfig, ExampleBatchSampler, load_classification, load_tokenizer
from ..eval import evaluate_classifier
from ..eval.flops import flops_per_token
from ..fileio import atomic_write_text
from ..models import ClassifierConfig, LMOutput, ModelConfig, SequenceClassifier, model_config_from_dict
from ..models.classifier import POOLINGS
from ..moe import experts_per_token
from ..moe.config import nest_settings
from ..tables import markdown_table
from .collectives import rank_zero_first
from .config import ExperimentConfig, TrainConfig
from .presets import _merge_moe
from .tasks import Task, to_device
from .trainer import Trainer

INITS = ("pretrained", "scratch")


@dataclass
class FinetuneConfig:
    """What launch/finetune.py adds to the trainer's settings: the checkpoint, the data, the head."""

    pretrained: str = ""
    """The pretrained checkpoint: a run folder, its checkpoints/ folder or a step folder of
    launch/pretrain.py (any ZeRO stage, process count and ep_size)."""
    data: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    """The labelled texts."""
    init: str = "pretrained"
    """'pretrained' (the checkpoint's weights) or 'scratch' (its architecture and tokenizer with a
    fresh initialisation: the baseline that shows what pretraining brings)."""
    pooling: str = "mean"
    """How a text's hidden states become one vector: 'mean' (over its real tokens) or 'last' (its
    last real token)."""
    moe_overrides: Dict[str, Any] = field(default_factory=dict)
    """Fields of the pretrained model's moe settings (its block kind's and router's included) to
    change for fine-tuning, e.g. {'uncertainty_coef': 0.0}; launch/finetune.py's --set."""
    dropout: Optional[float] = None
    """Dropout during fine-tuning (None: the pretrained model's)."""
    eval_k: Sequence[int] = (1, 2)
    """Experts per token of the final evaluation, each in its own full pass over valid and test."""
    eval_batch_size: int = 32
    """Texts per evaluation forward (speed only)."""

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = ClassificationDataConfig(**self.data)
        require(isinstance(self.pretrained, str) and self.pretrained != "", "finetune.pretrained",
                "required: a checkpoint of launch/pretrain.py (run folder, checkpoints/ or step folder)")
        check_choice(self.init, "finetune.init", INITS)
        check_choice(self.pooling, "finetune.pooling", POOLINGS)
        require(isinstance(self.moe_overrides, dict), "finetune.moe_overrides", "must be a dict of moe fields")
        self.eval_k = tuple(self.eval_k)
        require(len(self.eval_k) > 0, "finetune.eval_k", "give at least one value, e.g. --eval-k 1 2")
        for k in self.eval_k:
            check_int(k, "finetune.eval_k", 1)
        check_int(self.eval_batch_size, "finetune.eval_batch_size", 1)
        if self.dropout is not None:
            check_number(self.dropout, "finetune.dropout", 0.0, strict=False)
            require(self.dropout < 1, "finetune.dropout", f"must be < 1, got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


def pretrained_meta(path: str) -> Dict[str, Any]:
    """The pretrained checkpoint's meta.json (model config, tokenizer), read before any compute."""
    try:
        step_dir = resolve_checkpoint(path)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--checkpoint", "finetune.pretrained")) from None
    meta = read_meta_file(step_dir, f"finetune.pretrained: {step_dir}", required=())
    if "model_config" not in meta:
        raise ConfigError(f"finetune.pretrained: {step_dir} records no model config; pass a checkpoint of "
                          "launch/pretrain.py")
    if "classifier" in meta:
        raise ConfigError(f"finetune.pretrained: {step_dir} is a fine-tuned classifier; pass a language model's "
                          "checkpoint, or --resume to continue that fine-tuning run in its own --out-dir")
    if not os.path.isfile(os.path.join(step_dir, TOKENIZER)):
        raise ConfigError(f"finetune.pretrained: {step_dir} has no {TOKENIZER}; fine-tuning tokenizes with the "
                          "pretrained model's own tokenizer")
    # Every rank builds the model meta.json describes: it must fit the stored weights before that.
    check_config_fits(model_config_from_dict(meta["model_config"]), stored_shapes(step_dir),
                      f"finetune.pretrained: {os.path.join(step_dir, META)}")
    return {**meta, "step_dir": step_dir}


def finetune_model_config(cfg: FinetuneConfig, meta: Dict[str, Any]) -> ModelConfig:
    """The pretrained model's config with the fine-tuning overrides (validated again)."""
    model = model_config_from_dict(meta["model_config"]).to_dict()
    moe = model["moe"]
    flat = dict(cfg.moe_overrides)
    nested = nest_settings(flat, flat.get("block", moe["block"]), flat.get("router", moe["router"]),
                           label=lambda name: f"--set {name}")
    for name in ("block", "router", "num_experts", "k"):
        if name in nested and nested[name] != moe[name]:
            raise ConfigError(f"--set {name}: the pretrained model's {name} is {moe[name]!r}; fine-tuning keeps "
                              "the architecture (change eval_k, coefficients or noise settings instead)")
    model["moe"] = _merge_moe(moe, nested)
    if cfg.dropout is not None:
        model["dropout"] = cfg.dropout
    return model_config_from_dict(model)


def finetune_experiment(cfg: FinetuneConfig, parallel: Dict[str, Any], train: Dict[str, Any]) -> ExperimentConfig:
    """The ExperimentConfig of a fine-tuning run: the pretrained model (with the overrides), the
    given layout and loop; texts of at most the model's max_seq_len."""
    meta = pretrained_meta(cfg.pretrained)
    model = finetune_model_config(cfg, meta)
    train = {"out_dir": "runs/finetune", **train, "seq_len": model.max_seq_len}
    # No corpus settings: the task reads its labelled texts from cfg.data.
    return ExperimentConfig(model=model, parallel=parallel, task="classification", train=TrainConfig(**train))


class ClassificationTask(Task):
    """Sequence classification on labelled texts: seeded shuffled batches of whole texts (right
    padding, masked), cross-entropy plus the blocks' losses, accuracy and macro-F1 over full splits."""

    name = "classification"

    def __init__(self, cfg: FinetuneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.last_tokens = 0

    def prepare(self) -> None:
        meta = pretrained_meta(self.cfg.pretrained)
        self.step_dir = meta["step_dir"]
        self._tokenizer = load_tokenizer(os.path.join(self.step_dir, TOKENIZER))
        max_seq_len = model_config_from_dict(meta["model_config"]).max_seq_len
        # Rank 0 first: a hub download happens once, the others read datasets' cache.
        self.data = rank_zero_first(lambda: load_classification(self.cfg.data, self._tokenizer, max_seq_len))
        self.head = ClassifierConfig(num_labels=len(self.data.label_names), pooling=self.cfg.pooling)

    @property
    def tokenizer(self):
        return self._tokenizer

    def checkpoint_meta(self) -> Dict[str, Any]:
        """A resume must also match the head and the data."""
        d = self.data.identity
        return {"classifier": self.head.to_dict(),
                "classification_data": {k: d[k] for k in ("labels", "examples", "max_len", "truncation", "sha256")}}

    def build_model(self, model_cfg: ModelConfig, parallel):
        return SequenceClassifier(model_cfg, self.head, parallel)

    def load_initial_weights(self, model, layout) -> None:
        if self.cfg.init == "scratch":
            return
        state, _ = consolidate(self.step_dir)
        load_global_state(model.backbone, state, layout, f"finetune.pretrained: {self.step_dir}")

    def run_record(self) -> Dict[str, Any]:
        return {"finetune": self.cfg.to_dict(), "pretrained": os.path.abspath(self.step_dir),
                "classification_data": self.data.identity, "tokenizer": self.identity()}

    def describe(self) -> str:
        counts = self.data.identity["examples"]
        start = "fine-tuning" if self.cfg.init == "pretrained" else "training from scratch the architecture of"
        return (f"{start} {self.step_dir} on {self.cfg.data.dataset}: {len(self.data.label_names)} labels, "
                f"{', '.join(f'{n:,} {s}' for s, n in counts.items())} texts of at most "
                f"{self.data.identity['max_len']} tokens, pooling {self.head.pooling}")

    def make_sampler(self, seed: int, grad_accum: int) -> ExampleBatchSampler:
        """The micro-batches of every rank: each is one slice of the seeded permutation, rank r
        taking its positions r, r + W, ... (ExampleBatchSampler's layout, the same state_dict)."""
        return ExampleBatchSampler(len(self.data.splits["train"]), self.micro_batch * self.world_size, 0, 1, seed,
                                   grad_accum)

    def tokens_per_micro_batch(self) -> int:
        return self.last_tokens

    def next_batch(self):
        """This rank's texts, padded to the longest text of the micro-batch on any rank: with a
        rank's own longest, the ranks' token counts, and so DeepSpeed's capacities and the expert
        all-to-all's sizes, would differ. One length over all ranks, not over the expert-parallel
        group, keeps the padding, and so the training, the same for every ep_size. Every rank
        knows every rank's texts (one slice of one permutation), so no collective agrees on it."""
        train = self.data.splits["train"]
        everyone = self.sampler.next_indices()
        mine = everyone[self.rank::self.world_size]
        self.last_tokens = sum(len(train.ids[i]) for i in mine)  # the mask's ones
        return train.batch(mine, length=train.longest(everyone))

    def forward(self, engine, batch) -> LMOutput:
        x, y, mask = (to_device(t, engine.device) for t in batch)
        return engine(x, y, mask)

    def _evaluate(self, engine, split: str, max_batches=None) -> Dict[str, Any]:
        return evaluate_classifier(engine, self.data.splits[split], len(self.data.label_names),
                                   self.cfg.eval_batch_size, self.rank, self.world_size, engine.device, max_batches)

    def evaluate(self, engine, split: str, max_batches=None) -> Dict[str, float]:
        """Full pass over `split` (a collective), without the confusion matrix."""
        return {k: v for k, v in self._evaluate(engine, split, max_batches).items() if k != "confusion"}

    def final_report(self, engine, out_dir: str, log=print) -> Dict[str, Any]:
        """valid and test with each eval_k (a collective); rank 0 writes out_dir/finetune_eval.json."""
        cfg, model_cfg = self.cfg, self.model_cfg
        ks = list(cfg.eval_k) if model_cfg.moe.routed else [None]
        max_len = self.data.identity["max_len"]

        def cost(k):  # the classifier reads no LM head
            f = flops_per_token(model_cfg, max_len, k)
            return f["total"] - f["lm_head"]
        largest = cost(max(ks) if model_cfg.moe.routed else None)
        rows = []
        engine.eval()
        for k in ks:
            for split in ("valid", "test"):
                if split not in self.data.splits:
                    continue
                with contextlib.nullcontext() if k is None else experts_per_token(engine.module, k):
                    result = self._evaluate(engine, split)
                rows.append({"split": split, "eval_k": k, **result, "flops_per_token": cost(k),
                             "flops_vs_largest_k": cost(k) / largest})
        engine.train()
        report = {"pretrained": os.path.abspath(self.step_dir), "labels": list(self.data.label_names),
                  "data": self.data.identity, "results": rows}
        if self.rank == 0:
            atomic_write_text(os.path.join(out_dir, "finetune_eval.json"), json.dumps(report, indent=2) + "\n")
            log(markdown_table(["split", "eval_k", "accuracy", "macro-F1", "loss", "FLOPs vs the largest eval_k"],
                               [[r["split"], "-" if r["eval_k"] is None else r["eval_k"], f"{r['accuracy']:.4f}",
                                 f"{r['macro_f1']:.4f}", f"{r['loss']:.4f}", f"{r['flops_vs_largest_k']:.3f}"]
                                for r in rows]))
        return report


def finetune(cfg: FinetuneConfig, experiment: ExperimentConfig, ds_config, hooks=()) -> Dict[str, Any]:
    """Train the classifier, then (unless a stop signal ended the run) evaluate it with each eval_k."""
    task = ClassificationTask(cfg)
    trainer = Trainer(experiment, ds_config, task, hooks)
    final = trainer.run()
    if not final["stopped_by"]:
        final["report"] = task.final_report(trainer.engine, experiment.train.out_dir)
    return final
