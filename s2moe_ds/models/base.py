"""What every backbone returns, so that tasks, training and evaluation need no backbone of their own.

    forward(idx_BT, targets_BT=None, mask_BT=None, state=None) -> LMOutput

Shapes: B sequences, T tokens, V vocabulary.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch


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
