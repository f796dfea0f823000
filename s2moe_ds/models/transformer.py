"""A decoder-only Transformer language model whose feed-forward blocks are S2MoE, SMoE or dense.

Pre-norm blocks, causal attention through torch's scaled_dot_product_attention, learned position
embeddings, tied input/output embeddings. The model knows nothing of process groups: expert
parallelism lives inside the MoE blocks (their ep_size), and DeepSpeed wires it up at initialize.

Losses leave the model explicitly (LMOutput); the training loop weights them:
    total = task + balance_coef * sum_layers(L_balance) + uncertainty_coef * mean_layers(L_u)
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import nn

from ..config import ModelConfig
from ..moe import FFN, S2MoE, build_ffn_block


@dataclass
class LMOutput:
    logits: torch.Tensor
    """[B, T, vocab]"""
    task_loss: Optional[torch.Tensor]
    """Mean next-token cross-entropy over the unmasked targets (None without targets)."""
    balance_loss: torch.Tensor
    """Load-balancing loss summed over MoE layers (DeepSpeed's convention)."""
    uncertainty_loss: torch.Tensor
    """S2MoE's InfoNCE loss averaged over S2MoE layers (METHOD.md); 0 for other routers."""

    def total(self, balance_coef: float, uncertainty_coef: float) -> torch.Tensor:
        return self.task_loss + balance_coef * self.balance_loss + uncertainty_coef * self.uncertainty_loss


class CausalSelfAttention(nn.Module):

    def __init__(self, cfg: ModelConfig) -> None:
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

    def __init__(self, cfg: ModelConfig, moe: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        ffn = FFN(cfg.d_model, cfg.d_inner, cfg.dropout)
        self.ffn = build_ffn_block(cfg.moe, cfg.d_model, ffn) if moe else ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: torch.Tensor, mask_BT: Optional[torch.Tensor]):
        """Returns (x, balance_loss, uncertainty_loss or None when the block is not S2MoE)."""
        x_BTD = x_BTD + self.drop(self.attn(self.ln1(x_BTD)))
        h_BTD = self.ln2(x_BTD)
        zero = h_BTD.new_zeros((), dtype=torch.float32)
        if isinstance(self.ffn, S2MoE):
            parts = self.ffn.forward_parts(h_BTD, mask_BT)
            y_BTD, balance, uncertainty = parts.output, parts.balance_loss, parts.uncertainty_loss
        elif isinstance(self.ffn, MoE):
            # DeepSpeed's top-1 gating reads used_token as one flag per token of the flattened batch.
            y_BTD, balance, _ = self.ffn(h_BTD, None if mask_BT is None else mask_BT.reshape(-1))
            uncertainty = None
        else:
            y_BTD, balance, uncertainty = self.ffn(h_BTD), zero, None
        return x_BTD + self.drop(y_BTD), balance.float(), uncertainty


class LanguageModel(nn.Module):

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init_weights)
        # S2MoE's mixing gate keeps its own init (w = 0, b = mix_gate_init_bias): g starts at sigmoid(b).
        for block in self.blocks:
            if isinstance(block.ffn, S2MoE):
                block.ffn.reset_mix_gate()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def init_expert_weights(self, seed: int, ep_rank: int) -> None:
        """Initialise each expert from its GLOBAL id (ep_rank * local experts + local index), so
        the initial model is the same for any expert-parallel layout and no two experts start equal.
        Call before DeepSpeed takes its copies of the weights."""
        for layer_id, layer in enumerate(self.moe_layers()):
            experts = layer.deepspeed_moe.experts.deepspeed_experts
            for local_id, expert in enumerate(experts):
                global_id = ep_rank * len(experts) + local_id
                g = torch.Generator().manual_seed(seed * 1_000_003 + layer_id * 10_007 + global_id)
                for p in expert.parameters():
                    with torch.no_grad():
                        if p.dim() >= 2:
                            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                        else:
                            p.zero_()

    def moe_layers(self) -> List[nn.Module]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def forward(self, idx_BT: torch.Tensor, targets_BT: Optional[torch.Tensor] = None,
                mask_BT: Optional[torch.Tensor] = None) -> LMOutput:
        """idx/targets: [B, T] token ids; mask: [B, T], 0 on padding (left out of every loss)."""
        B, T = idx_BT.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        pos_T = torch.arange(T, device=idx_BT.device)
        x_BTD = self.drop(self.tok_emb(idx_BT) + self.pos_emb(pos_T))
        balance = x_BTD.new_zeros((), dtype=torch.float32)
        uncertainties = []
        for block in self.blocks:
            x_BTD, layer_balance, layer_uncertainty = block(x_BTD, mask_BT)
            balance = balance + layer_balance
            if layer_uncertainty is not None:
                uncertainties.append(layer_uncertainty)
        uncertainty = torch.stack(uncertainties).mean() if uncertainties else balance.new_zeros(())
        logits_BTV = F.linear(self.ln_f(x_BTD), self.tok_emb.weight)
        task = None
        if targets_BT is not None:
            nll_BT = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="none")
            if mask_BT is None:
                task = nll_BT.mean()
            else:
                m = mask_BT.flatten().float()
                task = (nll_BT * m).sum() / m.sum().clamp_min(1.0)
        return LMOutput(logits_BTV, task, balance, uncertainty)

    def layer_metrics(self) -> Dict[str, torch.Tensor]:
        """Detached per-MoE-layer values from the last forward, for logging: expert load (share of
        routes per expert), dropped-route share, and S2MoE's mixing-gate values."""
        out: Dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.moe_layers()):
            counts = layer.deepspeed_moe.exp_counts.float()
            out[f"layer{i}/expert_load"] = counts / counts.sum().clamp_min(1.0)
            out[f"layer{i}/dropped_fraction"] = layer.deepspeed_moe.gate.last_dropped_fraction
            if isinstance(layer, S2MoE) and "mix_gate" in layer.last_metrics:
                out[f"layer{i}/mix_gate"] = layer.last_metrics["mix_gate"]
        return out

    @torch.no_grad()
    def generate(self, idx_BT: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample continuations; call in eval mode (S2MoE then routes with eval_k experts, no noise)."""
        for _ in range(max_new_tokens):
            context_BT = idx_BT[:, -self.cfg.max_seq_len:]
            logits_BV = self(context_BT).logits[:, -1, :].float() / max(temperature, 1e-6)
            if top_k is not None:
                kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1])).values[:, -1:]
                logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
            probs_BV = F.softmax(logits_BV, dim=-1)
            next_B1 = torch.multinomial(probs_BV, 1, generator=generator)
            idx_BT = torch.cat([idx_BT, next_B1], dim=1)
        return idx_BT
