"""The trainer: builds a run from an ExperimentConfig, resumes it exactly, steps, evaluates,
checkpoints and stops on signals; a task supplies the data, the loss and the evaluator.

    Trainer(experiment, ds_config, task=None, hooks=()).run()       # pretrain() for short

Phases, each a method: setup (its own phases: settings, processes, task, resume, engine, task
start, restore, run record, loop), step (gradient accumulation of micro-batches, one optimizer
step, one host synchronisation: _vote), evaluate, save, stop. The task is a Task (tasks.py): the
trainer calls nothing else of it. Hooks (hooks.py) see each phase; tests inject faults through them.
"""

import json
import math
import os
import statistics
import time
from collections import deque
from typing import Any, Dict, List, Optional, Sequence

import deepspeed.comm as dist
import torch

from ..checkpoint import (FORMAT_VERSION, CheckpointWriteError, check_resumable, check_step_folder, complete_tags,
                          load, load_rank_state, read_meta, reshard, save, set_aside, tag_step)
from ..config import ConfigError
from ..data.config import check_output_folder
from ..fileio import atomic_write_text
from ..moe import expert_blocks, init_expert_weights
from ..parallel import ExpertLayout, check_ds_batch, check_ds_config, init_distributed, initialize, keep_global_batch, load_ds_config
from ..parallel import deepspeed_internals as ds
from ..progress import set_mode as set_progress_mode
from .collectives import max_over_ranks, rank_average
from .config import ExperimentConfig, TrainConfig
from .hooks import LoadBalancingBias, TrainerHook, TrainingStepSchedule
from .lock import RunLock
from .monitor import Monitor, layer_values, rank_averaged_keys
from .signals import REQUEUE_MARKER, StopRequest
from .tasks import Task, task_for
from .watchdog import Watchdog, collective_timeout_s


class UnhealthyLossError(RuntimeError):
    """A loss (or the weights) went bad on some rank; raised on every rank once the checkpoint
    whose weights gave it is set aside, with the last healthy checkpoint named."""


class NonFiniteLossError(UnhealthyLossError):
    """A loss became NaN or infinite."""


class LossSpikeError(UnhealthyLossError):
    """A loss rose above train.spike_factor times its recent median."""


class NonFiniteWeightsError(UnhealthyLossError):
    """Weights became NaN or infinite, found before a checkpoint would have saved them (an expert
    that no token reached, or the last update of a run, shows no loss that could tell)."""


HEALTHY, SPIKE, NON_FINITE = 0, 1, 2


def non_finite_parameters(module: torch.nn.Module) -> List[str]:
    """Names of the module's parameters that hold a NaN or an infinity (one device sync)."""
    named = list(module.named_parameters())
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def lr_schedule(ds_config: Dict[str, Any], train: TrainConfig) -> Dict[str, Any]:
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
        # DeepSpeed's schedule needs a positive warmup: no warmup is one step that starts at the full rate.
        params.setdefault("warmup_num_steps", max(train.warmup_steps, 1))
        params.setdefault("warmup_type", "linear")
        params.setdefault("warmup_min_ratio", 0.0 if train.warmup_steps else 1.0)
        params.setdefault("cos_min_ratio", train.min_lr_ratio)
        params["total_num_steps"] = train.max_steps
    return cfg


class Trainer:
    """One run: `experiment` names the task; `task` (a Task) is built from it when not given
    (language modelling from experiment.data); classification needs its FinetuneConfig, so
    finetune() passes its ClassificationTask."""

    def __init__(self, experiment: ExperimentConfig, ds_config, task: Optional[Task] = None,
                 hooks: Sequence[TrainerHook] = ()) -> None:
        self.experiment = experiment
        self.train_cfg = experiment.train
        self._ds_config_source = ds_config
        self.task = task_for(experiment, task)
        self.hooks = list(hooks)
        self.step = 0
        self.losses = []
        self.final: Dict[str, Any] = {"stopped_by": None}
        self.lock = RunLock()
        self.watchdog = None
        self.monitor = None
        self.stop = None
        self.stop_agreed = False

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Everything before the first step, phase by phase; every check raises before any compute."""
        ds_config = self._check_settings()
        self._join_processes(ds_config)
        self.lock.acquire(self.train_cfg.out_dir)
        set_progress_mode(self.train_cfg.progress)  # before the data preparation, which shows progress too
        self._prepare_task(ds_config)
        resume_tag, saved, batch_note = self._find_resume()
        self.engine = self._build_engine(resuming=resume_tag is not None)
        self._read_batch_sizes()
        self._announce(batch_note)
        self._start_task()
        self._restore(resume_tag, saved)
        self._write_run_record()
        self._prepare_loop(resume_tag)

    def _check_settings(self) -> Dict[str, Any]:
        """The DeepSpeed config (checked) and the run folder's writability, before any process group."""
        ds_config = load_ds_config(self._ds_config_source)
        check_ds_config(ds_config)
        # Here, not in TrainConfig: presets build one with their own out_dir before the flags replace it.
        check_output_folder(self.train_cfg.out_dir, "train.out_dir", "--out-dir")
        return ds_config

    def _join_processes(self, ds_config: Dict[str, Any]) -> None:
        """The process group, and the checks that need the world size."""
        train = self.train_cfg
        init_distributed(timeout_s=collective_timeout_s(train.hang_timeout_s),
                         expected_world_size=train.expect_world_size)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.experiment.check_world(self.world)
        check_ds_batch(ds_config, self.world)

    def _prepare_task(self, ds_config: Dict[str, Any]) -> None:
        """The task's data, the model config it implies, the learning-rate schedule and what a
        checkpoint of this run records (meta.json)."""
        self.task.prepare()
        self.model_cfg = self.task.configure_model(self.experiment.model)
        self.ds_config = lr_schedule(ds_config, self.train_cfg)
        self.ckpt_dir = os.path.join(self.train_cfg.out_dir, "checkpoints")
        self.meta = {"format_version": FORMAT_VERSION, "world_size": self.world,
                     "ep_size": self.experiment.parallel.ep_size, "model_config": self.model_cfg.to_dict(),
                     "tokenizer": self.task.identity(), **self.task.checkpoint_meta()}

    def _find_resume(self):
        """(the checkpoint tag to resume or None, its meta.json, a note on the kept global batch).
        Every rank checks (the files are small), so every rank stops together, before any compute."""
        train, exp = self.train_cfg, self.experiment
        resume_tag = (check_resumable(self.ckpt_dir, self.meta, self._relayout_refusal(), step=train.resume_step)
                      if train.resume else None)
        saved = read_meta(os.path.join(self.ckpt_dir, resume_tag)) if resume_tag is not None else {}
        self.relayout = bool(saved) and (saved.get("world_size"), saved.get("ep_size")) != (self.world, exp.parallel.ep_size)
        if not train.resume and complete_tags(self.ckpt_dir):
            raise ConfigError(f"train.out_dir: {train.out_dir} already holds checkpoints; pass --resume to "
                              "continue that run, or choose another --out-dir")
        batch_note = None
        if self.relayout and saved.get("global_batch") is not None and saved.get("world_size") != self.world:
            self.ds_config, batch_note = keep_global_batch(self.ds_config, self.world, saved["global_batch"],
                                                           f"--resume: {os.path.join(self.ckpt_dir, resume_tag)}")
        return resume_tag, saved, batch_note

    def _read_batch_sizes(self) -> None:
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.gas = self.engine.gradient_accumulation_steps()
        self.meta["global_batch"] = self.micro_batch * self.gas * self.world

    def _announce(self, batch_note: Optional[str]) -> None:
        if self.rank == 0:
            print(self._describe(), flush=True)
            if batch_note:
                print(batch_note, flush=True)

    def _start_task(self) -> None:
        """The task's sampler, then the per-rank seed of noise and dropout."""
        self.task.start(self.rank, self.world, self.micro_batch, self.train_cfg.seed, grad_accum=self.gas)
        torch.manual_seed(self.train_cfg.seed + 1 + self.rank)  # noise and dropout differ across ranks

    def _restore(self, resume_tag: Optional[str], saved: Dict[str, Any]) -> None:
        """A resume: weights, optimizer, schedule, data position and per-rank task state (on this
        layout, or resharded from another one); later checkpoints of --resume-step set aside."""
        if resume_tag is not None and self.relayout:
            state = self._load_on_new_layout(resume_tag, saved)
            self.task.load_state_dict(state)
            self.step = state["step"]
        elif resume_tag is not None:
            state = load(self.engine, self.ckpt_dir, resume_tag)
            self.task.load_state_dict(state)
            if self.task.rank_state_dict() is not None:
                self.task.load_rank_state_dict(load_rank_state(self.ckpt_dir, resume_tag), self.engine.device)
            self.step = state["step"]
        if self.train_cfg.resume_step is not None:
            self._supersede_newer(resume_tag)

    def _write_run_record(self) -> None:
        """run_config.json (rank 0), also saved in each checkpoint's client state."""
        exp, train = self.experiment, self.train_cfg
        self.record = {"format_version": FORMAT_VERSION, "task": exp.task, "model": self.model_cfg.to_dict(),
                       "parallel": exp.parallel.to_dict(), **self.task.run_record(), "train": train.to_dict(),
                       "deepspeed": self.ds_config, "world_size": self.world}
        if self.rank == 0:
            atomic_write_text(os.path.join(train.out_dir, "run_config.json"), json.dumps(self.record, indent=2))

    def _prepare_loop(self, resume_tag: Optional[str]) -> None:
        """The monitor, the loss terms, the step schedule hook and the health checks' memory."""
        train = self.train_cfg
        self.monitor = Monitor(train, self.rank == 0, start_step=self.step)
        self.loss_terms = self.model_cfg.moe.loss_terms()
        self.hooks[:0] = [TrainingStepSchedule(self.engine.module, train.max_steps),
                          *LoadBalancingBias.of(self.engine.module)]
        self.last_saved = self.step if train.resume else -1
        self.recent_losses = deque(maxlen=train.spike_window)  # this rank's, for the spike check
        if resume_tag is not None and self.rank == 0:
            print(f"resumed from {os.path.join(self.ckpt_dir, resume_tag)} at step {self.step}", flush=True)

    def _relayout_refusal(self):
        """Why this run could not resume a checkpoint of another world size or ep_size (None: it can)."""
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage not in (1, 2):
            return (f"the DeepSpeed config's ZeRO stage is {stage}: a change of layout reads and writes ZeRO 1/2 "
                    "optimizer shards; resume with ZeRO 1 or 2 (ds_configs/zero2.json)")
        if self.model_cfg.has_memory:
            return ("a backbone with memory keeps one memory per rank along streams laid out per rank, so it "
                    "resumes on its own layout only")
        return None

    def _load_on_new_layout(self, tag: str, saved: Dict[str, Any]) -> Dict[str, Any]:
        """Resume a checkpoint of another world size or ep_size (checkpoint/reshard.py): weights,
        master weights, Adam moments and step counts by global parameter name, the LR schedule and
        counters, the data position; randomness from (seed, step, rank)."""
        step_dir = os.path.join(self.ckpt_dir, tag)
        check_step_folder(step_dir)
        reshard.load_rank_share(self.engine, self.layout, step_dir, saved, self.model_cfg.moe.num_experts)
        client = reshard.saved_client_state(step_dir)
        reshard.restore_engine_counters(self.engine, client)
        reshard.reseed(self.train_cfg.seed, client["step"], self.rank)
        if self.rank == 0:
            print(f"resharded {step_dir} (world {saved['world_size']}, ep_size {saved['ep_size']}) onto world "
                  f"{self.world}, ep_size {self.experiment.parallel.ep_size}", flush=True)
        return client

    def _build_engine(self, resuming: bool):
        exp, seed = self.experiment, self.train_cfg.seed
        torch.manual_seed(seed)
        model = self.task.build_model(self.model_cfg, exp.parallel)
        layout = ExpertLayout(1)
        if expert_blocks(model):
            layout = ExpertLayout.from_process_groups(self.model_cfg.moe.num_experts, exp.parallel.ep_size,
                                                      self.ds_config)
            init_expert_weights(model, seed, layout)
        if not resuming:
            self.task.load_initial_weights(model, layout)  # a resume loads its own weights instead
        engine, _, _, _ = initialize(model, self.ds_config)
        self.layout = layout
        # Which experts and which ZeRO partition of them each rank held: what a later resume on
        # another layout reads the optimizer shards by.
        ranks = [None] * self.world
        dist.all_gather_object(ranks, [layout.ep_rank, ds.expert_data_parallel_rank(f"ep_size_{layout.ep_size}")
                                       if expert_blocks(model) else self.rank])
        self.meta["expert_ranks"] = ranks
        return engine

    def _describe(self) -> str:
        moe, engine = self.model_cfg.moe, self.engine
        n_params = sum(p.numel() for p in engine.module.parameters())
        routing = f"block {moe.block}" + (f", router {moe.router}" if moe.routed else "")
        return (f"model: {n_params:,} parameters on rank 0, {routing}, {len(expert_blocks(engine.module))} MoE layers | "
                f"world {self.world}, ep_size {self.experiment.parallel.ep_size}, "
                f"ZeRO {engine.zero_optimization_stage()}, bf16 {engine.bfloat16_enabled()}, "
                f"optimizer {ds.optimizer_name(engine)} | global batch {self.micro_batch * self.gas * self.world} x "
                f"{self.train_cfg.seq_len} tokens | {self.task.describe()}")

    # ------------------------------------------------------------------------------------ the loop

    def run(self) -> Dict[str, Any]:
        """Train to max_steps (or stop_after, or a stop signal); the final metrics."""
        try:
            self.setup()
            self.watchdog = Watchdog(self.rank, self.world, self.train_cfg.out_dir, self.train_cfg.hang_timeout_s)
            self.watchdog.start()
            return self._train()
        except (ConfigError, UnhealthyLossError, CheckpointWriteError):
            raise  # their messages say what happened
        except Exception as e:
            if self.watchdog is not None:
                self.watchdog.report_failure(e)
            raise
        finally:
            if self.monitor is not None:
                self.monitor.flush()
            if self.watchdog is not None:
                self.watchdog.stop()
            self.lock.release()  # the process may go on (tests, notebooks) and start another run here

    def _train(self) -> Dict[str, Any]:
        train = self.train_cfg
        end = train.max_steps if train.stop_after is None else min(train.stop_after, train.max_steps)
        self.engine.train()
        self.stop = StopRequest(train.save_on_signal)
        try:
            while self.step < end:
                self.train_step()
                if train.eval_interval and (self.step % train.eval_interval == 0 or self.step == train.max_steps):
                    self.evaluate("valid")
                stopping = self.stop_agreed  # voted within the step, with its losses
                if (train.save_interval and self.step % train.save_interval == 0) or self.step == end or stopping:
                    self.save()
                if stopping:
                    self.stop_for_requeue()
                    break
        finally:
            self.stop.restore()
        self.monitor.close(self.step, self.ckpt_dir if self.last_saved >= 0 else None,
                           self.task.next_commands(self.ckpt_dir))
        return {**self.final, "step": self.step, "losses": self.losses}

    def train_step(self) -> None:
        """One optimizer step of gradient_accumulation_steps micro-batches, then its logging. The
        host reads the device once per step (_vote), after the last micro-batch's backward and
        before the optimizer step: no micro-batch waits for the one before it."""
        step = self.step + 1
        for hook in self.hooks:
            hook.on_step_start(self, step)
        start = time.perf_counter()
        totals, parts = [], []
        for micro in range(self.gas):
            self._at(step, "forward" if self.gas == 1 else f"forward {micro + 1}/{self.gas}")
            out = self.task.forward(self.engine, self.task.next_batch())
            for hook in self.hooks:
                hook.after_forward(self, step, out)
            loss, micro_parts = self.task.loss(out, self.loss_terms)
            totals.append(loss.detach())
            parts.append(micro_parts)
            self._at(step, "backward")
            self.engine.backward(loss)
            if micro == self.gas - 1:
                values = self._vote(step, totals, parts)
            self._at(step, "optimizer step")
            self.engine.step()
        self._at(step, "end of step")
        seconds = time.perf_counter() - start
        self.step = step
        value = values[-1]  # the step's loss is its last micro-batch's, as it always was
        self.losses.append(value)
        self.recent_losses.append(value)
        layer = {}
        if self.monitor.log_now(step):
            metrics = layer_values(out.layer_metrics)
            layer = rank_average(metrics, rank_averaged_keys(metrics))  # a collective: every rank
        tokens = self.gas * self.task.tokens_per_micro_batch() * self.world
        self.monitor.train_step(step, self.engine, value, parts[-1], layer, tokens, seconds)
        for hook in self.hooks:
            hook.on_step_end(self, step)

    def _vote(self, step: int, totals: List[torch.Tensor], parts) -> List[float]:
        """The step's one host synchronisation: every micro-batch's loss and verdict (judged on
        the device), the worst verdict of each over the ranks and the stop-signal vote travel in
        one all-reduce and one read. This rank's losses, as floats.

        A bad loss stops every rank together before the optimizer step, so no update applies it:
        the first micro-batch that was bad on some rank is named, with its values, as when each
        micro-batch was checked on its own; the micro-batches after it have run their forward and
        backward too (their gradients are dropped with the run)."""
        n = len(totals)
        values = torch.stack(totals).double()  # float64: the comparison the host makes on .item()'s float
        threshold, why = self._spike_threshold()
        spike = (values > threshold).double() * SPIKE
        verdicts = torch.where(torch.isfinite(values), spike, torch.full_like(values, NON_FINITE))
        signalled = torch.full((1,), float(self.stop is not None and self.stop.requested()), dtype=values.dtype,
                               device=values.device)
        mine = torch.cat([verdicts, signalled])
        worst = mine.clone()
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # every rank stops together, none left in a collective
        host = torch.cat([worst, mine, values]).tolist()
        worst, mine, losses = host[:n + 1], host[n + 1:2 * n + 2], host[2 * n + 2:]
        self.stop_agreed = worst[n] > 0
        for micro in range(n):
            if worst[micro] != HEALTHY:
                self._stop_unhealthy(step, int(worst[micro]), int(mine[micro]), losses[micro], parts[micro],
                                     why if mine[micro] == SPIKE else "")
        return losses

    def _spike_threshold(self):
        """(the loss above which this rank's loss is a spike, inf when none is; why, for the message)."""
        factor = self.train_cfg.spike_factor
        if not (factor and self.recent_losses):
            return math.inf, ""
        median = statistics.median(self.recent_losses)
        return factor * max(median, 1.0), (f" above {factor} x {max(median, 1.0):.4g} (the median of this rank's "
                                           f"last {len(self.recent_losses)} step losses is {median:.4g})")

    def _stop_unhealthy(self, step: int, worst: int, verdict: int, value: float, parts, why: str) -> None:
        """The weights that gave step `step`'s loss are those after step - 1: its checkpoint (and
        any later one) is set aside, so that `latest` and --resume name the last healthy one."""
        poisoned, moved, advice = self._set_aside_from(step - 1)
        kind = "non-finite loss" if worst == NON_FINITE else "loss spike"
        shown = ", ".join(f"{name}={v.item()}" for name, v in parts.items())
        mine = f"total={value}{why}, {shown}" if verdict == worst else f"on another rank (here total={value}, {shown})"
        aside = (f"; the checkpoint of step {step - 1}, whose weights gave it, is set aside"
                 + (f" as {moved[0]}" if moved else "")) if poisoned else ""
        error = NonFiniteLossError if worst == NON_FINITE else LossSpikeError
        raise error(f"{kind} at step {step}: {mine}{aside}{advice}")

    def _set_aside_from(self, step: int):
        """Collective: sets aside every checkpoint of step `step` or later: as poisoned those this
        run saved (weights known bad), as superseded those newer than its last save (left by a
        continuation a resume did not take); (the poisoned tags, every new path on rank 0, the
        sentence naming the last healthy one)."""
        tags = complete_tags(self.ckpt_dir)
        poisoned = [t for t in tags if step <= tag_step(t) <= self.last_saved]
        leftover = [t for t in tags if tag_step(t) >= step and tag_step(t) > self.last_saved]
        healthy = next((t for t in tags if tag_step(t) < step), None)
        moved = self._set_aside(poisoned, "poisoned") + self._set_aside(leftover, "superseded")
        if healthy is not None:
            advice = (f"; the last healthy checkpoint is {os.path.join(self.ckpt_dir, healthy)} (step "
                      f"{tag_step(healthy)}), which --resume takes: resume with a lower --lr")
        else:
            advice = "; no earlier checkpoint is known healthy: start again with a lower --lr"
        return poisoned, moved, advice

    def _check_finite_weights(self, step: int) -> None:
        """Before a save, collective: every rank checks its own parameters (its experts, its copy
        of the rest), one all-reduce agrees; non-finite weights are never saved as a checkpoint."""
        bad = non_finite_parameters(self.engine.module)
        if not max_over_ranks(int(bool(bad))):
            return
        _, moved, advice = self._set_aside_from(step)
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        mine = f"rank {self.rank}'s {shown}" if bad else "on another rank"
        aside = f"; later checkpoints set aside: {', '.join(moved)}" if moved else ""
        raise NonFiniteWeightsError(f"non-finite weights after step {step}: {mine}; the checkpoint of step {step} "
                                    f"was not written{aside}{advice}")

    def _supersede_newer(self, tag: str) -> None:
        """A resume from a named step: later checkpoints belong to the abandoned continuation; set
        aside, so that a plain --resume after this run never returns to them."""
        later = [t for t in complete_tags(self.ckpt_dir) if tag_step(t) > tag_step(tag)]
        moved = self._set_aside(later, "superseded")
        if moved:
            print(f"--resume-step {tag_step(tag)}: set aside {len(moved)} later checkpoint(s): {', '.join(moved)}",
                  flush=True)

    def _set_aside(self, tags, why: str):
        """Collective: rank 0 renames `tags` once every rank has listed the folders; the new
        paths on rank 0, [] elsewhere."""
        dist.barrier()
        moved = set_aside(self.ckpt_dir, tags, why) if tags and self.rank == 0 else []
        dist.barrier()
        return moved

    def _at(self, step: int, phase: str) -> None:
        if self.watchdog is not None:
            self.watchdog.progress(step, phase)

    def evaluate(self, split: str) -> Dict[str, float]:
        self._at(self.step, f"evaluate {split}")
        self.engine.eval()
        result = self.task.evaluate(self.engine, split, self.train_cfg.eval_max_batches)
        self.engine.train()
        self.final[split] = result
        self.monitor.eval(self.step, split, result)
        for hook in self.hooks:
            hook.after_evaluation(self, self.step, split, result)
        return result

    def save(self) -> str:
        step = self.step
        self._at(step, "checkpoint")
        self._check_finite_weights(step)
        client_state = {**self.meta, "step": step, **self.task.state_dict(), "run": self.record}

        def before_commit(path: str) -> None:
            for hook in self.hooks:
                hook.before_checkpoint_commit(self, step, path)

        tag = save(self.engine, self.ckpt_dir, step, client_state, self.train_cfg.keep_checkpoints,
                   self.task.tokenizer, meta=self.meta, before_commit=before_commit,
                   rank_state=self.task.rank_state_dict())
        self.last_saved = step
        for hook in self.hooks:
            hook.after_checkpoint(self, step, os.path.join(self.ckpt_dir, tag))
        return tag

    def stop_for_requeue(self) -> None:
        reason = self.stop.signal_name or "another rank's signal"
        self.final["stopped_by"] = reason
        if self.rank == 0:
            # The job script reads this marker, not srun's exit status, which a task killed
            # after the others exited could change.
            atomic_write_text(os.path.join(self.train_cfg.out_dir, REQUEUE_MARKER), f"{reason} at step {self.step}\n")
            print(f"\n{reason}: checkpointed step {self.step}, exiting for requeue", flush=True)
        for hook in self.hooks:
            hook.on_stop_signal(self, self.step, reason)


def pretrain(experiment: ExperimentConfig, ds_config, task: Optional[Task] = None, hooks: Sequence[TrainerHook] = ()) -> Dict[str, Any]:
    """Train, evaluate and checkpoint; returns the final metrics (also on TensorBoard)."""
    return Trainer(experiment, ds_config, task, hooks).run()
