"""Rank 0's view of training: a progress bar and TensorBoard events, written once.

Scalars: train/{loss,task_loss,balance_loss,uncertainty_loss,lr,grad_norm,tokens_per_s},
valid/{bpc|ppl,nll_per_token}; per MoE layer moe/layer<i>/{expert<e>_load,dropped_fraction,
mix_gate_mean} and the histogram moe/layer<i>/mix_gate. Expert load and dropped share are
averaged over every rank (each routes as many tokens), the mixing gate is rank 0's tokens.
"""

import os
from typing import Dict, List, Optional, Tuple

import deepspeed.comm as dist
import torch

from ..config import TrainConfig


_RANK_AVERAGED = ("expert_load", "dropped_fraction")


def _rank_averaged(values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """values with the expert loads and dropped shares averaged over all ranks, in one all-reduce."""
    keys = [k for k in values if k.endswith(_RANK_AVERAGED)]
    if not keys or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    parts = [values[k].detach().float().reshape(-1) for k in keys]
    flat = torch.cat([p.to(parts[0].device) for p in parts])  # on the device: NCCL refuses CPU tensors
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out = dict(values)
    for k, chunk in zip(keys, flat.split([p.numel() for p in parts])):
        out[k] = chunk.reshape(values[k].shape)
    return out


class Monitor:

    def __init__(self, cfg: TrainConfig, is_writer: bool, start_step: int = 0) -> None:
        self.cfg = cfg
        self.is_writer = is_writer
        self.losses: List[float] = []
        self.writer = None
        self.bar = None
        if is_writer:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm.auto import tqdm
            self.tb_dir = os.path.join(cfg.out_dir, "tensorboard")
            self.writer = SummaryWriter(self.tb_dir)
            self.bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def train_step(self, step: int, engine, out, loss: torch.Tensor, model, tokens: int, seconds: float) -> None:
        """Call on every rank: on logging steps the per-layer routing values are averaged over the
        ranks, a collective."""
        value = loss.item()
        self.losses.append(value)
        log_now = step % self.cfg.log_interval == 0 or step == self.cfg.max_steps
        layer_values = _rank_averaged(model.layer_metrics()) if log_now else {}
        if not self.is_writer:
            return
        tokens_per_s = tokens / max(seconds, 1e-9)
        self.bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        self.bar.update(1)
        if not log_now:
            return
        grad_norm = engine.get_global_grad_norm()
        scalars = {
            "train/loss": value,
            "train/task_loss": out.task_loss.item(),
            "train/balance_loss": out.balance_loss.item(),
            "train/uncertainty_loss": out.uncertainty_loss.item(),
            "train/lr": engine.get_lr()[0],
            "train/tokens_per_s": tokens_per_s,
        }
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        for name, value_t in layer_values.items():
            layer, what = name.split("/", 1)
            if what == "expert_load":
                for e, share in enumerate(value_t.tolist()):
                    scalars[f"moe/{layer}/expert{e}_load"] = share
            elif what == "mix_gate":
                scalars[f"moe/{layer}/mix_gate_mean"] = value_t.float().mean().item()
                self.writer.add_histogram(f"moe/{layer}/mix_gate", value_t.float(), step)
            else:
                scalars[f"moe/{name}"] = float(value_t)
        for tag, v in scalars.items():
            self.writer.add_scalar(tag, v, step)

    def eval(self, step: int, split: str, result: Dict[str, float]) -> None:
        if not self.is_writer:
            return
        for key in ("bpc", "ppl", "nll_per_token"):
            if key in result:
                self.writer.add_scalar(f"{split}/{key}", result[key], step)
        shown = ", ".join(f"{k} {result[k]:.4f}" for k in ("bpc", "ppl", "nll_per_token") if k in result)
        self.bar.write(f"step {step}: {split} {shown}")
        self.writer.flush()

    def close(self, step: int, ckpt_dir: Optional[str]) -> None:
        if not self.is_writer:
            return
        self.bar.close()
        self.writer.flush()
        self.writer.close()
        print(f"\nTrained {step} steps. TensorBoard:  tensorboard --logdir {self.tb_dir}")
        if ckpt_dir:
            print(f"Checkpoints: {ckpt_dir}\nSample:       python launch/generate.py --checkpoint {ckpt_dir}\n"
                  f"Evaluate:     python launch/evaluate.py --checkpoint {ckpt_dir} --analysis")


def read_scalars(tb_dir: str, tag: str) -> List[Tuple[int, float]]:
    """(step, value) of one scalar tag from a run's TensorBoard folder, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags().get("scalars", []):
        return []
    return sorted((e.step, e.value) for e in events.Scalars(tag))
