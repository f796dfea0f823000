"""The feed-forward network used as an expert, and on every token as the 'dense' block."""

import torch
import torch.nn.functional as F
from torch import nn

from .blocks.base import Block, BlockOutput


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


class FFN(Block, nn.Module):
    """Two-layer MLP, d_model -> d_inner -> d_model, with GELU (or ReLU) and dropout."""

    kind = "dense"

    def __init__(self, d_model: int, d_inner: int, dropout: float = 0.0, activation: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_inner)
        self.fc2 = nn.Linear(d_inner, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.activation(self.fc1(x)))))

    def forward_parts(self, hidden_states: torch.Tensor, used_token=None, token_ids=None) -> BlockOutput:
        return BlockOutput(self(hidden_states))
