"""A sequence classifier: any backbone of registry.py with its blocks, pooled, then one linear head.

    model = SequenceClassifier(model_cfg, ClassifierConfig(num_labels=5), parallel)
    out = model(idx_BT, labels_B, mask_BT)       # LMOutput: logits [B, C], cross-entropy, block losses

The backbone is the language model's own module under `backbone.` (its LM head unused), so a
pretrained language model's state dict loads into it unchanged. The blocks see the padding mask,
so padding stays out of S2MoE's noise statistics and InfoNCE sample as it does in pretraining.
Each text is read on its own (no memory across texts).

Shapes: B texts, T tokens (right padding), D = d_model, C labels.
"""

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_choice, check_int
from .base import LMOutput, init_weights
from .registry import build_model

POOLINGS = ("mean", "last")


@dataclass
class ClassifierConfig:
    """The classification head on a backbone."""

    num_labels: int = 2
    """Classes (the fine-tuning data sets it from its declared labels)."""
    pooling: str = "mean"
    """How the text's hidden states become one vector: 'mean' (over its real tokens) or 'last'
    (its last real token, which a causal backbone has read the whole text at)."""

    def __post_init__(self) -> None:
        check_int(self.num_labels, "classifier.num_labels", 2)
        check_choice(self.pooling, "classifier.pooling", POOLINGS)

    def to_dict(self) -> dict:
        return asdict(self)


def pool(h_BTD: torch.Tensor, mask_BT: Optional[torch.Tensor], pooling: str) -> torch.Tensor:
    """[B, D]: the mean of the real tokens' states, or the last real token's."""
    if mask_BT is None:
        mask_BT = torch.ones(h_BTD.shape[:2], device=h_BTD.device)
    m_BT1 = mask_BT.to(h_BTD.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (h_BTD * m_BT1).sum(1) / m_BT1.sum(1).clamp_min(1.0)
    last_B = (mask_BT.long().sum(1) - 1).clamp_min(0)
    return h_BTD[torch.arange(h_BTD.shape[0], device=h_BTD.device), last_B]


class SequenceClassifier(nn.Module):

    def __init__(self, cfg, head: ClassifierConfig, parallel=None) -> None:
        super().__init__()
        self.cfg, self.head_cfg = cfg, head
        # The head first: how many random numbers the backbone draws depends on its expert
        # layout, and the head must start the same on any layout.
        self.head = nn.Linear(cfg.d_model, head.num_labels)
        init_weights(self.head)
        self.backbone = build_model(cfg, parallel)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx_BT: torch.Tensor, labels_B: Optional[torch.Tensor] = None,
                mask_BT: Optional[torch.Tensor] = None, state=None) -> LMOutput:
        """idx: [B, T]; labels: [B] class ids; mask: [B, T], 0 on padding. `state` is ignored."""
        h_BTD, collected, _ = self.backbone.features(idx_BT, mask_BT)
        logits_BC = self.head(self.drop(pool(h_BTD, mask_BT, self.head_cfg.pooling)))
        loss = None if labels_B is None else F.cross_entropy(logits_BC.float(), labels_B)
        return collected.output(logits_BC, loss)
