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


BACKBONES: Dict[str, BackboneSpec] = {
    "gpt": BackboneSpec(build=gpt.GPT, settings=None, attention_flops=gpt.attention_flops),
    "txl": BackboneSpec(build=txl.TransformerXL, settings=txl.TransformerXLConfig, attention_flops=txl.attention_flops,
                        memory=txl.has_memory, check=txl.check),
}


def check_backbone(name: str) -> None:
    check_choice(name, "model.backbone", tuple(BACKBONES))


def build_model(cfg, parallel=None):
    """The backbone `cfg.backbone` names, with its blocks laid out by `parallel` (ParallelConfig)."""
    check_backbone(cfg.backbone)
    return BACKBONES[cfg.backbone].build(cfg, parallel)
