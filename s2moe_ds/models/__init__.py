"""Language-model backbones (no parallelism, data or training): registry.py names them."""

from .base import LMOutput
from .config import ModelConfig
from .gpt import GPT
from .registry import BACKBONES, build_model, check_backbone, model_config_from_dict

__all__ = ["BACKBONES", "GPT", "LMOutput", "ModelConfig", "build_model", "check_backbone", "model_config_from_dict"]
