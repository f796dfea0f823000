"""Analytic FLOPs per token of a language model, counted the usual way (2 FLOPs per multiply-add
of every matmul; norms, activations, softmax and the embedding lookup are left out).

Per layer and token, with d = d_model, ctx = mean causal context:
    attention   what the backbone says (models/registry.py): for 'gpt' 6 d^2 (q, k, v) + 2 d^2
                (output) + 4 ctx d (scores and weighted sum); 'txl' adds its memory to the context
                and counts keys, values and distance encodings recomputed over memory
    FFN block   what its kind says (moe/blocks/*.py, `flops`): a dense FFN 4 d f; a MoE layer
                the router (2 d E for a linear one; moe/routers/*.py count theirs) + k_active * 4 d f;
                S2MoE in training twice that (the clean and the noisy copy) plus 2 d for its mixing gate
plus the tied output projection 2 d V. A causal sequence of T tokens attends to (T + 1) / 2
positions on average. A backward pass costs twice its forward.
"""

from typing import Dict, Optional

from ..models import BACKBONES, ModelConfig
from ..moe import BLOCKS
from ..moe.registry import router_flops


def flops_per_token(cfg: ModelConfig, seq_len: int, experts_per_token: Optional[int] = None,
                    training: bool = False) -> Dict[str, float]:
    """Forward FLOPs per token split by component, and their 'total'.

    experts_per_token: active experts per token in an MoE layer (default: eval_k for inference,
    k for training). training=True counts the blocks' training work and the backward pass (x3).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
    d, moe = cfg.d_model, cfg.moe
    k = experts_per_token if experts_per_token is not None else (moe.k if training else moe.resolved_eval_k)
    out = {"attention": cfg.n_layer * BACKBONES[cfg.backbone].attention_flops(cfg, seq_len, training)}
    routing = router_flops(moe, d, training) if moe.routed else 0
    for i in range(cfg.n_layer):
        for name, value in BLOCKS[cfg.block_kind(i)].flops(moe, d, cfg.d_inner, k, training, routing).items():
            out[name] = out.get(name, 0) + value
    out["lm_head"] = 2 * d * cfg.vocab_size
    scale = 3.0 if training else 1.0
    out = {name: float(v) * scale for name, v in out.items()}
    out["total"] = sum(out.values())
    return out


def inference_cost_ratio(cfg: ModelConfig, seq_len: int, k_small: int = 1, k_large: int = 2) -> float:
    """Total inference FLOPs per token with k_small experts over that with k_large (e.g. 1 vs 2)."""
    return (flops_per_token(cfg, seq_len, k_small)["total"] / flops_per_token(cfg, seq_len, k_large)["total"])
