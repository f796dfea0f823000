"""'gpt': a decoder-only Transformer language model with any feed-forward block kind.

Pre-norm blocks, causal attention through torch's scaled_dot_product_attention, learned position
embeddings, tied input/output embeddings. The feed-forward block of each layer comes from
moe/registry.py (ModelConfig.block_kind); the model knows no block kind, no process group and
no loss weighting: blocks return their named losses and metrics (moe/blocks/base.py), the model
collects them per layer into LMOutput, and the task weighs them.

Shapes: B sequences, T tokens, D = d_model, H heads of d = D / H, V vocabulary.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import FFN, build_block
from ..moe.spec import ModelContext
from .base import LayerOutputs, LMOutput, init_weights, next_token_loss, sample_next


def attention_flops(cfg, seq_len: int, training: bool) -> float:
    """Per token and layer: q, k, v and output projections, then scores and the weighted sum over
    the mean causal context."""
    ctx = (min(seq_len, cfg.max_seq_len) + 1) / 2
    return 8 * cfg.d_model ** 2 + 4 * ctx * cfg.d_model


class CausalSelfAttention(nn.Module):

    def __init__(self, cfg) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split(D, dim=-1)
        q_BHTd, k_BHTd, v_BHTd = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        y_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, is_causal=True,
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y_BHTd.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):

    def __init__(self, cfg, kind: str, ep_size: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = build_block(cfg.moe, kind, cfg.d_model, FFN(cfg.d_model, cfg.d_inner, cfg.dropout, cfg.activation), ep_size,
                               ModelContext(vocab_size=cfg.vocab_size))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: torch.Tensor, mask_BT: Optional[torch.Tensor], idx_BT: torch.Tensor):
        """(x, the feed-forward block's BlockOutput)."""
        x_BTD = x_BTD + self.drop(self.attn(self.ln1(x_BTD)))
        parts = self.ffn.forward_parts(self.ln2(x_BTD), mask_BT, idx_BT)
        return x_BTD + self.drop(parts.output), parts


class GPT(nn.Module):

    def __init__(self, cfg, parallel=None) -> None:
        super().__init__()
        ep_size = 1 if parallel is None else parallel.ep_size
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.block_kind(i), ep_size) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(init_weights)
        for block in self.blocks:
            block.ffn.reset_block_parameters()  # e.g. S2MoE's mixing gate starts at sigmoid(b)

    def features(self, idx_BT: torch.Tensor, mask_BT: Optional[torch.Tensor] = None, state=None):
        """(the last layer's normed hidden states [B, T, D], the blocks' LayerOutputs, None): what
        the LM head and a classification head (models/classifier.py) read."""
        B, T = idx_BT.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        pos_T = torch.arange(T, device=idx_BT.device)
        x_BTD = self.drop(self.tok_emb(idx_BT) + self.pos_emb(pos_T))
        collected = LayerOutputs()
        for block in self.blocks:
            x_BTD, parts = block(x_BTD, mask_BT, idx_BT)
            collected.add(parts)
        return self.ln_f(x_BTD), collected, None

    def forward(self, idx_BT: torch.Tensor, targets_BT: Optional[torch.Tensor] = None,
                mask_BT: Optional[torch.Tensor] = None, state=None) -> LMOutput:
        """idx/targets: [B, T] token ids; mask: [B, T], 0 on padding (left out of every loss).
        The backbone has no memory: `state` is ignored and None comes back."""
        h_BTD, collected, _ = self.features(idx_BT, mask_BT)
        logits_BTV = F.linear(h_BTD, self.tok_emb.weight)
        return collected.output(logits_BTV, next_token_loss(logits_BTV, targets_BT, mask_BT))

    @torch.no_grad()
    def generate(self, idx_BT: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample continuations; call in eval mode (blocks then route with eval_k experts, no noise)."""
        for _ in range(max_new_tokens):
            context_BT = idx_BT[:, -self.cfg.max_seq_len:]
            next_B1 = sample_next(self(context_BT).logits[:, -1, :], temperature, top_k, generator)
            idx_BT = torch.cat([idx_BT, next_B1], dim=1)
        return idx_BT
