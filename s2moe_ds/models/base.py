"""What every backbone returns, so that tasks, training and evaluation need no backbone of their own.

    forward(idx_BT, targets_BT=None, mask_BT=None, state=None) -> LMOutput

Shapes: B sequences, T tokens, V vocabulary.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F


@dataclass
class LMOutput:
    logits: torch.Tensor
    """[B, T, V]"""
    task_loss: Optional[torch.Tensor]
    """Mean next-token cross-entropy over the unmasked targets (None without targets)."""
    layer_losses: Dict[str, List[torch.Tensor]] = field(default_factory=dict)
    """Each named auxiliary loss of the blocks, one value per layer that reports it, in layer
    order; moe.total_loss weighs and reduces them as MoEConfig.loss_terms() says."""
    layer_metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    """'layer<i>/<metric>' of the i-th block that reports metrics (the MoE layers): detached values."""
    state: Any = None
    """What the backbone carries to the next segment (None for backbones without memory)."""


def next_token_loss(logits_BTV: torch.Tensor, targets_BT: Optional[torch.Tensor],
                    mask_BT: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Mean cross-entropy (fp32) over the targets where mask is 1; None without targets."""
    if targets_BT is None:
        return None
    nll_BT = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="none")
    if mask_BT is None:
        return nll_BT.mean()
    m = mask_BT.flatten().float()
    return (nll_BT * m).sum() / m.sum().clamp_min(1.0)


class LayerOutputs:
    """Collects the blocks' BlockOutputs layer by layer into LMOutput's per-layer losses and metrics."""

    def __init__(self) -> None:
        self.losses: Dict[str, List[torch.Tensor]] = {}
        self.metrics: Dict[str, torch.Tensor] = {}
        self.reporting = 0

    def add(self, parts) -> None:
        for name, value in parts.losses.items():
            self.losses.setdefault(name, []).append(value)
        if parts.metrics:
            self.metrics.update({f"layer{self.reporting}/{name}": value for name, value in parts.metrics.items()})
            self.reporting += 1

    def output(self, logits_BTV: torch.Tensor, task_loss: Optional[torch.Tensor], state: Any = None) -> LMOutput:
        return LMOutput(logits_BTV, task_loss, self.losses, self.metrics, state)


def init_weights(module) -> None:
    """The backbones' generic initialisation (module.apply): N(0, 0.02) weights, zero biases."""
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, torch.nn.Linear) and module.bias is not None:
        torch.nn.init.zeros_(module.bias)


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, 1] token ids drawn from the last position's logits, at `temperature`, among the top_k."""
    logits_BV = logits_BV.float() / max(temperature, 1e-6)
    if top_k is not None:
        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1])).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    return torch.multinomial(F.softmax(logits_BV, dim=-1), 1, generator=generator)
