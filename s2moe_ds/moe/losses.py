"""Named auxiliary losses and the one function that forms the total loss from them.

Every block returns its losses by name (BlockOutput.losses: 'balance', 'uncertainty', ...). The
block kind declares, from its config, a LossTerm per name: the coefficient and how the values of
the model's layers are reduced into one ('sum' or 'mean'). total_loss is the only place where
they are weighted and added to the task loss.
"""

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

LAYER_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class LossTerm:
    coef: float
    """Weight of the reduced loss in the total."""
    over_layers: str
    """'sum' or 'mean' over the layers that report the loss."""


def reduce_over_layers(values: List[torch.Tensor], how: str, device=None) -> torch.Tensor:
    if not values:
        return torch.zeros((), device=device)
    if how == "sum":
        return sum(values)
    return torch.stack(values).mean()


def total_loss(task_loss: torch.Tensor, layer_losses: Dict[str, List[torch.Tensor]],
               terms: Dict[str, LossTerm]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(task + sum over terms of coef * reduced loss, the reduced value of each named loss)."""
    reduced = {name: reduce_over_layers(layer_losses.get(name, []), term.over_layers, task_loss.device)
               for name, term in terms.items()}
    total = task_loss
    for name, term in terms.items():
        total = total + term.coef * reduced[name]
    return total, reduced
