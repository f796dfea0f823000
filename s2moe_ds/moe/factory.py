"""One factory for the feed-forward block, so every comparison is one flag (`router`) apart.

All three return DeepSpeed MoE's interface, `out, l_aux, exp_counts = block(x)`:
- 's2moe': S2MoE (this project's layer);
- 'smoe':  DeepSpeed's own `MoE`, with the gate made deterministic in eval mode and given eval_k
           and eval_drop_tokens (training is DeepSpeed's unchanged);
- 'dense': the expert FFN applied to every token, l_aux = 0.
"""

from dataclasses import asdict

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from ..config import MoEConfig
from .gate import install_eval_deterministic_gate
from .layer import S2MoE


class DenseFFN(nn.Module):
    """A dense FFN with the MoE call signature; exp_counts is the token count (one 'expert')."""

    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.ffn = ffn

    def forward(self, hidden_states: torch.Tensor, used_token=None):
        out = self.ffn(hidden_states)
        num_tokens = hidden_states.numel() // hidden_states.shape[-1]
        counts = torch.full((1, ), num_tokens, dtype=torch.long, device=hidden_states.device)
        return out, hidden_states.new_zeros((), dtype=torch.float32), counts


def _deepspeed_moe_args(cfg: MoEConfig) -> dict:
    return dict(num_experts=cfg.num_experts,
                ep_size=cfg.ep_size,
                k=cfg.k,
                capacity_factor=cfg.capacity_factor,
                eval_capacity_factor=cfg.eval_capacity_factor,
                min_capacity=cfg.min_capacity,
                noisy_gate_policy=cfg.noisy_gate_policy,
                drop_tokens=cfg.drop_tokens,
                use_rts=cfg.use_rts,
                top2_2nd_expert_sampling=cfg.top2_2nd_expert_sampling)


def build_ffn_block(cfg: MoEConfig, hidden_size: int, expert: nn.Module) -> nn.Module:
    """The feed-forward block `cfg.router` names, with `expert` as the (per-expert) FFN."""
    if cfg.router == "dense":
        return DenseFFN(expert)
    if cfg.router == "smoe":
        moe = MoE(hidden_size, expert, **_deepspeed_moe_args(cfg))
        install_eval_deterministic_gate(moe, cfg.resolved_eval_k, cfg.eval_drop_tokens)
        return moe
    return S2MoE(hidden_size,
                 expert,
                 **_deepspeed_moe_args(cfg),
                 eval_k=cfg.resolved_eval_k,
                 eval_drop_tokens=cfg.eval_drop_tokens,
                 balance_coef=cfg.balance_coef,
                 **asdict(cfg.s2moe))
