"""Backbones by name: name -> BackboneSpec. A new backbone is a file plus one entry here.

Every builder takes (model_cfg, parallel_cfg) and returns a module whose forward follows
models/base.py; blocks come from moe/registry.py. A backbone's own settings are a dataclass in its
file (ModelConfig.backbone_config holds them), as a block kind's are.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from ..config import check_choice
from . import gpt, txl


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable
    """build(model_cfg, parallel_cfg) -> the model module."""
    settings: Optional[type]
    """The dataclass of the backbone's own settings (ModelConfig.backbone_config), or None."""
    attention_flops: Callable
    """attention_flops(model_cfg, seq_len, training) -> forward FLOPs per token of one layer's attention."""
    memory: Callable = lambda model_cfg: False
    """memory(model_cfg) -> whether the model carries state from one segment to the next, so that
    training reads the data as ordered streams and evaluation keeps the state along each stream."""
    check: Callable = lambda model_cfg: None
    """Checks across ModelConfig and the backbone's settings, raising ConfigError."""


def _gpt_attention_flops(cfg, seq_len: int, training: bool) -> float:
    # q, k, v and output projections, then scores and the weighted sum over the mean causal context.
    ctx = (min(seq_len, cfg.max_seq_len) + 1) / 2
    return 8 * cfg.d_model ** 2 + 4 * ctx * cfg.d_model


def _txl_attention_flops(cfg, seq_len: int, training: bool) -> float:
    # Per segment of T tokens over M memory positions (K = M + T keys): queries and output on the
    # segment, keys and values recomputed over all K, the distance projection of K encodings (per
    # sequence), content scores and the weighted sum over the mean causal context M + (T + 1) / 2,
    # and the distance scores over all K.
    d, s = cfg.d_model, cfg.backbone_config
    inner = cfg.n_head * txl.head_size(cfg)
    T = min(seq_len, cfg.max_seq_len)
    M = s.memory(training)
    K = M + T
    return 4 * d * inner + 6 * d * inner * K / T + 4 * (M + (T + 1) / 2) * inner + 2 * K * inner


BACKBONES: Dict[str, BackboneSpec] = {
    "gpt": BackboneSpec(build=gpt.GPT, settings=None, attention_flops=_gpt_attention_flops),
    "txl": BackboneSpec(build=txl.TransformerXL, settings=txl.TransformerXLConfig, attention_flops=_txl_attention_flops,
                        memory=lambda cfg: cfg.backbone_config.mem_len > 0 or bool(cfg.backbone_config.eval_mem_len),
                        check=txl.check),
}


def check_backbone(name: str) -> None:
    check_choice(name, "model.backbone", tuple(BACKBONES))


def build_model(cfg, parallel=None):
    """The backbone `cfg.backbone` names, with its blocks laid out by `parallel` (ParallelConfig)."""
    check_backbone(cfg.backbone)
    return BACKBONES[cfg.backbone].build(cfg, parallel)
