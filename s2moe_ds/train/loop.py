"""The pretraining loop: DeepSpeed engine, data, evaluation, TensorBoard, checkpoints, exact resume."""

import json
import os
import signal
import threading
import time
from dataclasses import replace
from typing import Any, Dict

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

from ..config import ConfigError, ModelConfig, TrainConfig
from ..data import ContiguousBatchSampler, DataConfig, PreparedCorpus, eval_batches, prepare_corpus
from ..eval import evaluate_split
from ..fileio import atomic_write_text
from ..models import LanguageModel
from . import checkpoint
from .deepspeed_setup import check_ds_config, init_distributed, initialize, load_ds_config
from .metrics import Monitor


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is left as it was."""


EXIT_REQUEUE = 75
"""Exit status of a run stopped by SIGUSR1/SIGTERM after checkpointing (EX_TEMPFAIL): requeue me."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

REQUEUE_MARKER = "REQUEUE"
"""Written in out_dir by rank 0 when a stop signal ended the run after a checkpoint."""


class _StopRequest:
    """Remembers a stop signal; the loop acts on it at the next step boundary, on every rank at once."""

    def __init__(self, enabled: bool) -> None:
        self.signal_name = None
        self._previous = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled (SLURM may signal the ranks at different times)."""
        return _any_rank(self.signal_name is not None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _schedule(ds_config: Dict[str, Any], train: TrainConfig) -> Dict[str, Any]:
    """The DeepSpeed config with our warmup + cosine schedule over max_steps (and --lr, if given).

    DeepSpeed's WarmupCosineLR is used so that the engine saves and restores the scheduler with
    the checkpoint. A scheduler already in the config is kept, with total_num_steps set to max_steps.
    """
    cfg = json.loads(json.dumps(ds_config))
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if train.lr is not None:
        opt.setdefault("params", {})["lr"] = train.lr
    if "lr" not in opt.get("params", {}):
        raise ConfigError("optimizer.params.lr: the DeepSpeed config sets no learning rate; add one or pass --lr")
    sched = cfg.setdefault("scheduler", {"type": "WarmupCosineLR", "params": {}})
    params = sched.setdefault("params", {})
    if sched["type"] == "WarmupCosineLR":
        params.setdefault("warmup_num_steps", train.warmup_steps)
        params.setdefault("warmup_type", "linear")
        params.setdefault("warmup_min_ratio", 0.0)
        params.setdefault("cos_min_ratio", train.min_lr_ratio)
        params["total_num_steps"] = train.max_steps
    return cfg


def check_layout(model: ModelConfig, train: TrainConfig, world_size: int) -> None:
    """Checks that need the world size; all raise before any compute."""
    ep = model.moe.ep_size
    if model.moe.router != "dense" and world_size % ep:
        raise ConfigError(f"moe.ep_size: {ep} must divide the world size {world_size} "
                          "(expert-parallel groups tile the ranks); pick a divisor of the process count")
    if train.seq_len > model.max_seq_len:
        raise ConfigError(f"train.seq_len: {train.seq_len} exceeds model.max_seq_len {model.max_seq_len}; "
                          "lower --seq-len or raise --max-seq-len")


def _prepare_data(data: DataConfig) -> PreparedCorpus:
    # Rank 0 tokenizes and fills the cache; the others then only read it.
    if dist.get_rank() == 0:
        corpus = prepare_corpus(data)
    dist.barrier()
    if dist.get_rank() != 0:
        corpus = prepare_corpus(data)
    return corpus


def _any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any: ranks that decide to stop must stop together,
    never one of them left waiting inside a collective."""
    # On the accelerator: NCCL refuses CPU tensors (on CPU this is "cpu" and gloo).
    t = torch.tensor([1.0 if flag else 0.0], device=get_accelerator().current_device_name())
    dist.all_reduce(t)
    return t.item() > 0


def _all_finite(*values: torch.Tensor) -> bool:
    return not _any_rank(not all(bool(torch.isfinite(v.detach()).all()) for v in values))


def pretrain(model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig,
             ds_config: Dict[str, Any]) -> Dict[str, Any]:
    """Train, evaluate and checkpoint; returns the final metrics (also on TensorBoard)."""
    ds_config = load_ds_config(ds_config)
    check_ds_config(ds_config)
    init_distributed(expected_world_size=train_cfg.expect_world_size)
    rank, world = dist.get_rank(), dist.get_world_size()
    check_layout(model_cfg, train_cfg, world)
    corpus = _prepare_data(data_cfg)
    model_cfg = replace(model_cfg, vocab_size=corpus.tokenizer.vocab_size)
    ds_config = _schedule(ds_config, train_cfg)
    ckpt_dir = os.path.join(train_cfg.out_dir, "checkpoints")
    expect = {"world_size": world, "ep_size": model_cfg.moe.ep_size, "model_config": model_cfg.to_dict(),
              "tokenizer": corpus.tokenizer.identity()}
    # Every rank checks (the files are small), so every rank stops together, before any compute.
    resume_tag = checkpoint.check_resumable(ckpt_dir, expect) if train_cfg.resume else None
    if not train_cfg.resume and checkpoint.latest_tag(ckpt_dir) is not None:
        raise ConfigError(f"train.out_dir: {train_cfg.out_dir} already holds checkpoints; pass --resume to "
                          "continue that run, or choose another --out-dir")

    torch.manual_seed(train_cfg.seed)
    model = LanguageModel(model_cfg)
    # DeepSpeed's default layout puts consecutive ranks in one expert-parallel group.
    model.init_expert_weights(train_cfg.seed, rank % model_cfg.moe.ep_size)
    engine, _, _, _ = initialize(model, ds_config)
    micro_bs = engine.train_micro_batch_size_per_gpu()
    gas = engine.gradient_accumulation_steps()
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        optimizer = type(getattr(engine, "basic_optimizer", None) or engine.optimizer).__name__
        print(f"model: {n_params:,} parameters on rank 0, router {model_cfg.moe.router}, "
              f"{len(model.moe_layers())} MoE layers | world {world}, ep_size {model_cfg.moe.ep_size}, "
              f"ZeRO {engine.zero_optimization_stage()}, bf16 {engine.bfloat16_enabled()}, optimizer {optimizer} | "
              f"global batch {micro_bs * gas * world} x {train_cfg.seq_len} tokens | data {corpus.identity.get('dataset')}, "
              f"{len(corpus.splits['train']):,} train tokens, tokenizer {corpus.tokenizer.identity()['kind']}",
              flush=True)
    sampler = ContiguousBatchSampler(corpus.splits["train"], train_cfg.seq_len, micro_bs, rank, world, train_cfg.seed)
    torch.manual_seed(train_cfg.seed + 1 + rank)  # noise and dropout differ across ranks

    step = 0
    if resume_tag is not None:
        state = checkpoint.load(engine, ckpt_dir, resume_tag)
        sampler.load_state_dict(state["sampler"])
        step = state["step"]
    record = _run_record(model_cfg, data_cfg, train_cfg, ds_config, corpus, world)
    if rank == 0:
        os.makedirs(train_cfg.out_dir, exist_ok=True)
        with open(os.path.join(train_cfg.out_dir, "run_config.json"), "w") as f:
            json.dump(record, f, indent=2)
    monitor = Monitor(train_cfg, rank == 0, start_step=step)
    moe = model_cfg.moe
    beta = moe.s2moe.uncertainty_coef if moe.router == "s2moe" else 0.0

    def client_state() -> Dict[str, Any]:
        return {**expect, "step": step, "sampler": sampler.state_dict(),
                "run": record}

    def run_eval(split: str) -> Dict[str, float]:
        engine.eval()
        result = evaluate_split(lambda x, y, m: engine(x, y, m),
                                eval_batches(corpus.splits[split], train_cfg.seq_len, micro_bs, rank, world),
                                engine.device, corpus.units[split], len(corpus.splits[split]), corpus.metric,
                                train_cfg.eval_max_batches)
        engine.train()
        return result

    if resume_tag is not None and rank == 0:
        print(f"resumed from {os.path.join(ckpt_dir, resume_tag)} at step {step}", flush=True)
    engine.train()
    final: Dict[str, Any] = {"stopped_by": None}
    last_saved = step if train_cfg.resume else -1
    end = train_cfg.max_steps if train_cfg.stop_after is None else min(train_cfg.stop_after, train_cfg.max_steps)
    stop = _StopRequest(train_cfg.save_on_signal)
    try:
        while step < end:
            t0 = time.perf_counter()
            for _ in range(gas):
                x, y = sampler.next_batch()
                out = engine(x.to(engine.device), y.to(engine.device))
                loss = out.total(moe.balance_coef, beta)
                if not _all_finite(loss):
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step + 1}: total={loss.item()}, task={out.task_loss.item()}, "
                        f"balance={out.balance_loss.item()}, uncertainty={out.uncertainty_loss.item()}; "
                        f"the last good checkpoint in {ckpt_dir} is unchanged (resume with a lower --lr)")
                engine.backward(loss)
                engine.step()
            step += 1
            tokens = gas * micro_bs * train_cfg.seq_len * world
            monitor.train_step(step, engine, out, loss, model, tokens, time.perf_counter() - t0)
            if train_cfg.eval_interval and (step % train_cfg.eval_interval == 0 or step == train_cfg.max_steps):
                final["valid"] = run_eval("valid")
                monitor.eval(step, "valid", final["valid"])
            stopping = stop.agreed()
            if (train_cfg.save_interval and step % train_cfg.save_interval == 0) or step == end or stopping:
                checkpoint.save(engine, ckpt_dir, step, client_state(), train_cfg.keep_checkpoints,
                                corpus.tokenizer, meta=expect)
                last_saved = step
            if stopping:
                final["stopped_by"] = stop.signal_name or "another rank's signal"
                if rank == 0:
                    # The job script reads this marker, not srun's exit status, which a task killed
                    # after the others exited could change.
                    atomic_write_text(os.path.join(train_cfg.out_dir, REQUEUE_MARKER),
                                      f"{final['stopped_by']} at step {step}\n")
                    print(f"\n{final['stopped_by']}: checkpointed step {step}, exiting for requeue", flush=True)
                break
    finally:
        stop.restore()
    monitor.close(step, ckpt_dir if last_saved >= 0 else None)
    final["step"] = step
    final["losses"] = monitor.losses
    return final


def _run_record(model_cfg, data_cfg, train_cfg, ds_config, corpus, world) -> Dict[str, Any]:
    from dataclasses import asdict
    return {"model": model_cfg.to_dict(), "data": asdict(data_cfg), "train": train_cfg.to_dict(),
            "deepspeed": ds_config, "world_size": world, "tokenizer": corpus.tokenizer.identity(),
            "corpus": corpus.identity}
