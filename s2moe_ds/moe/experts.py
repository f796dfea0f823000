"""The feed-forward network used as an expert, and on every token as the 'dense' block; and the
local experts of a MoE layer computed in one batched matmul instead of DeepSpeed's loop.

Shapes: G expert-parallel ranks the tokens came from, L local experts, C capacity per expert,
D = d_model, H = d_inner, N = G * C tokens per expert.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import deepspeed_internals as ds
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


EXPERT_IMPLEMENTATIONS = ("loop", "batched")


class BatchedExperts(nn.Module):
    """DeepSpeed's local experts, the same FFN modules, in one batched matmul per linear layer.

    DeepSpeed pads every expert to the same capacity, so the dispatched [G, L, C, D] input is a
    stack of L equal-sized problems: the experts' weights are stacked at each call (the autograd
    graph hands each expert its own gradient) and two baddbmm calls replace the loop's 2 * L
    matmuls, which on a GPU are launch-bound for small experts. The modules stay where DeepSpeed put
    them (DeepSpeed's attribute, adopted), so parameter names, the expert parameter groups, expert parallelism
    and the per-expert checkpoint files are unchanged: a checkpoint of either implementation loads
    in the other. Dropout draws one mask over the stack instead of one per expert (the same
    distribution, other random numbers)."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        ds.adopt_local_experts(self, experts)
        if not all(isinstance(e, FFN) for e in ds.expert_modules(self)):
            raise TypeError("BatchedExperts computes FFN experts (moe/experts.py) only")

    def forward(self, x_GLCD: torch.Tensor) -> torch.Tensor:
        G, L, C, D = x_GLCD.shape
        experts = ds.expert_modules(self)
        first = experts[0]
        x_LND = x_GLCD.transpose(0, 1).reshape(L, G * C, D)
        w1_LDH = torch.stack([e.fc1.weight for e in experts]).transpose(1, 2)
        b1_L1H = torch.stack([e.fc1.bias for e in experts]).unsqueeze(1)
        h_LNH = first.dropout(first.activation(torch.baddbmm(b1_L1H, x_LND, w1_LDH)))
        w2_LHD = torch.stack([e.fc2.weight for e in experts]).transpose(1, 2)
        b2_L1D = torch.stack([e.fc2.bias for e in experts]).unsqueeze(1)
        y_LND = first.dropout(torch.baddbmm(b2_L1D, h_LNH, w2_LHD))
        return y_LND.reshape(L, G, C, D).transpose(0, 1)
