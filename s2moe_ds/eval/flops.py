"""Analytic FLOPs per token of the language model, counted the usual way (2 FLOPs per multiply-add
of every matmul; norms, activations, softmax and the embedding lookup are left out).

Per layer and token, with d = d_model, f = d_inner, E = experts, ctx = mean causal context:
    attention   6 d^2 (q, k, v) + 2 d^2 (output) + 4 ctx d (scores and weighted sum)
    dense FFN   4 d f
    MoE FFN     2 d E (router) + k_active * 4 d f
plus the tied output projection 2 d V. A causal sequence of T tokens attends to (T + 1) / 2
positions on average. In training an S2MoE layer runs its experts on the clean AND the noisy
copy (2 k routes per token) and computes the mixing gate (2 d); a backward pass costs twice its
forward.
"""

from typing import Dict, Optional

from ..config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int, experts_per_token: Optional[int] = None,
                    training: bool = False) -> Dict[str, float]:
    """Forward FLOPs per token split by component, and their 'total'.

    experts_per_token: active experts per token in an MoE layer (default: eval_k for inference,
    k for training). training=True counts S2MoE's second path and the backward pass (x3 overall).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
    d, f, moe = cfg.d_model, cfg.d_inner, cfg.moe
    k = experts_per_token if experts_per_token is not None else (moe.k if training else moe.resolved_eval_k)
    ctx = (min(seq_len, cfg.max_seq_len) + 1) / 2
    paths = 2 if (training and moe.router == "s2moe") else 1
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layer))
    n_dense = cfg.n_layer - n_moe
    out = {
        "attention": cfg.n_layer * (8 * d * d + 4 * ctx * d),
        "dense_ffn": n_dense * 4 * d * f,
        "router": n_moe * paths * 2 * d * moe.num_experts,
        "experts": n_moe * paths * k * 4 * d * f,
        "mix_gate": n_moe * 2 * d if paths == 2 else 0.0,
        "lm_head": 2 * d * cfg.vocab_size,
    }
    scale = 3.0 if training else 1.0
    out = {name: float(v) * scale for name, v in out.items()}
    out["total"] = sum(out.values())
    return out


def inference_cost_ratio(cfg: ModelConfig, seq_len: int, k_small: int = 1, k_large: int = 2) -> float:
    """Total inference FLOPs per token with k_small experts over that with k_large (e.g. 1 vs 2)."""
    return (flops_per_token(cfg, seq_len, k_small)["total"] / flops_per_token(cfg, seq_len, k_large)["total"])
