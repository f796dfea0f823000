"""Rank 0's view of training: progress (a bar on a terminal, a line per log interval in a log
file: s2moe_ds/progress.py) and TensorBoard events. No collectives here: the trainer averages what
needs every rank before it hands values over.

The line, one per --log-interval on stdout (a format that tests/system/test_logs.py parses; keep it):
    step 120/5000 | loss 3.2145 | lr 1.98e-03 | tokens/s 10342 | eta 0:13:05
loss is that step's (train/loss), tokens/s the interval's tokens over its steps' time, eta the
steps left to max_steps at this invocation's wall-clock pace (evaluations and checkpoints included).

Scalars: train/{loss,task_loss,<name>_loss for each named auxiliary loss,lr,grad_norm,tokens_per_s},
valid/{bpc|ppl,nll_per_token}; per MoE layer moe/layer<i>/{expert<e>_load,dropped_fraction,
mix_gate_mean} and the histogram moe/layer<i>/mix_gate. Expert load and dropped share are averaged
over every rank (each routes as many tokens), the mixing gate is rank 0's tokens.
"""

import os
import sys
import time
from typing import Dict, List, Optional, Sequence, TextIO, Tuple

import torch

from ..progress import clock, use_bar
from .config import TrainConfig

RANK_AVERAGED = ("expert_load", "dropped_fraction")
"""Per-layer values the trainer averages over the ranks before logging."""
EVAL_SCALARS = ("bpc", "ppl", "nll_per_token", "accuracy", "macro_f1", "loss")
"""What an evaluation result may hold that is logged: the language model's and the classifier's."""


def layer_values(layer_metrics: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The model's per-layer metrics as logged: routes per expert become each expert's share."""
    out = {}
    for name, value in layer_metrics.items():
        layer, what = name.split("/", 1)
        if what == "expert_counts":
            counts = value.float()
            out[f"{layer}/expert_load"] = counts / counts.sum().clamp_min(1.0)
        else:
            out[name] = value
    return out


def rank_averaged_keys(values: Dict[str, torch.Tensor]) -> List[str]:
    return [k for k in values if k.endswith(RANK_AVERAGED)]


POSTFIX_INTERVAL_S = 1.0
"""The bar's loss and tokens/s are renewed at most this often: setting them redraws the bar, which
would otherwise happen every step, past tqdm's own rate limit."""


def step_line(step: int, max_steps: int, loss: float, lr: float, tokens_per_s: float, eta_s: float) -> str:
    """The log line of one logging step (the format the module docstring shows)."""
    return f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | tokens/s {tokens_per_s:.0f} | eta {clock(eta_s)}"


class StepLines:
    """What a log file gets instead of the bar: the pace between logging steps."""

    def __init__(self, max_steps: int, start_step: int) -> None:
        self.max_steps = max_steps
        self.start_step = start_step
        self.start = time.perf_counter()
        self.tokens = 0
        self.seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def line(self, step: int, loss: float, lr: float) -> str:
        tokens_per_s = self.tokens / max(self.seconds, 1e-9)
        self.tokens, self.seconds = 0, 0.0
        per_step = (time.perf_counter() - self.start) / max(step - self.start_step, 1)
        return step_line(step, self.max_steps, loss, lr, tokens_per_s, per_step * (self.max_steps - step))


class Monitor:
    """`stream`: where a bar would be drawn (stderr by default); whether it is a terminal decides
    bar or lines under --progress auto. Lines and evaluation results go to stdout."""

    def __init__(self, cfg: TrainConfig, is_writer: bool, start_step: int = 0, stream: Optional[TextIO] = None) -> None:
        self.cfg = cfg
        self.is_writer = is_writer
        self.writer = None
        self.bar = None
        self.lines = None
        if is_writer:
            from torch.utils.tensorboard import SummaryWriter
            self.tb_dir = os.path.join(cfg.out_dir, "tensorboard")
            self.writer = SummaryWriter(self.tb_dir)
            if use_bar(stream, cfg.progress):
                from tqdm.auto import tqdm
                self.bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                                file=stream)
                self.postfix_at = float("-inf")
            else:
                self.lines = StepLines(cfg.max_steps, start_step)

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def train_step(self, step: int, engine, loss: float, losses: Dict[str, torch.Tensor],
                   layer: Dict[str, torch.Tensor], tokens: int, seconds: float) -> None:
        """Progress every step (the bar) or every logging step (a line) and, on logging steps, the
        scalars (rank 0 writes; the other ranks return at once). `losses`: the task's and each
        named loss, reduced over layers; `layer`: the per-layer values, averaged over the ranks
        where RANK_AVERAGED says."""
        if not self.is_writer:
            return
        tokens_per_s = tokens / max(seconds, 1e-9)
        if self.bar is not None:
            now = time.monotonic()
            if now - self.postfix_at >= POSTFIX_INTERVAL_S:
                self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                self.postfix_at = now
            self.bar.update(1)
        else:
            self.lines.add(tokens, seconds)
        if not self.log_now(step):
            return
        lr = engine.get_lr()[0]
        if self.lines is not None:
            print(self.lines.line(step, loss, lr), flush=True)
        scalars = {"train/loss": loss, **{f"train/{name}_loss": v.item() for name, v in losses.items()},
                   "train/lr": lr, "train/tokens_per_s": tokens_per_s,
                   "train/step_ms": 1000 * seconds}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        for name, value_t in layer.items():
            layer_name, what = name.split("/", 1)
            if what == "expert_load":
                for e, share in enumerate(value_t.tolist()):
                    scalars[f"moe/{layer_name}/expert{e}_load"] = share
            elif what == "mix_gate":
                scalars[f"moe/{layer_name}/mix_gate_mean"] = value_t.float().mean().item()
                self.writer.add_histogram(f"moe/{layer_name}/mix_gate", value_t.float(), step)
            else:
                scalars[f"moe/{name}"] = float(value_t)
        for tag, v in scalars.items():
            self.writer.add_scalar(tag, v, step)

    def log_now(self, step: int) -> bool:
        return step % self.cfg.log_interval == 0 or step == self.cfg.max_steps

    def eval(self, step: int, split: str, result: Dict[str, float]) -> None:
        if not self.is_writer:
            return
        for key in EVAL_SCALARS:
            if key in result:
                self.writer.add_scalar(f"{split}/{key}", result[key], step)
        shown = ", ".join(f"{k} {result[k]:.4f}" for k in EVAL_SCALARS if k in result)
        self._say(f"step {step}: {split} {shown}")
        self.writer.flush()

    def flush(self) -> None:
        """Write what TensorBoard holds (at any exit, the launch scripts end with os._exit)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self, step: int, ckpt_dir: Optional[str], next_commands: Sequence[str] = ()) -> None:
        """Ends the progress bar and TensorBoard; prints where the run is and `next_commands`."""
        if not self.is_writer:
            return
        if self.bar is not None:
            self.bar.close()
        self.writer.flush()
        self.writer.close()
        print(f"\nTrained {step} steps. TensorBoard:  tensorboard --logdir {self.tb_dir}")
        if ckpt_dir:
            print("\n".join([f"Checkpoints: {ckpt_dir}", *next_commands]))


def read_all_scalars(tb_dir: str) -> Dict[str, List[Tuple[int, float]]]:
    """Every scalar tag of a run's TensorBoard folder: tag -> (step, value) in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: sorted((e.step, e.value) for e in events.Scalars(tag)) for tag in events.Tags().get("scalars", [])}


def read_scalars(tb_dir: str, tag: str) -> List[Tuple[int, float]]:
    """(step, value) of one scalar tag from a run's TensorBoard folder, in step order."""
    return read_all_scalars(tb_dir).get(tag, [])
