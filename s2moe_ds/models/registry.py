"""Backbones by name: name -> (config class, builder). A new backbone is a file plus one line here.

Every builder takes (model_cfg, parallel_cfg) and returns a module whose forward follows
models/base.py; blocks come from moe/registry.py.
"""

from dataclasses import dataclass
from typing import Callable, Dict

from ..config import check_choice
from . import gpt
from .config import ModelConfig


@dataclass(frozen=True)
class BackboneSpec:
    config: type
    build: Callable


BACKBONES: Dict[str, BackboneSpec] = {
    "gpt": BackboneSpec(config=ModelConfig, build=gpt.GPT),
}


def check_backbone(name: str) -> None:
    check_choice(name, "model.backbone", tuple(BACKBONES))


def model_config_from_dict(d: dict) -> ModelConfig:
    """The model config a checkpoint or run record stores, in its backbone's config class."""
    backbone = d.get("backbone", "gpt")
    check_backbone(backbone)
    return BACKBONES[backbone].config(**d)


def build_model(cfg: ModelConfig, parallel=None):
    """The backbone `cfg.backbone` names, with its blocks laid out by `parallel` (ParallelConfig)."""
    check_backbone(cfg.backbone)
    return BACKBONES[cfg.backbone].build(cfg, parallel)
