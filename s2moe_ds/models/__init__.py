"""Language-model backbones (no parallelism, data or training): registry.py names them."""

from .base import LMOutput
from .classifier import ClassifierConfig, SequenceClassifier
from .config import ModelConfig, model_config_from_dict
from .gpt import GPT
from .registry import BACKBONES, build_model, check_backbone
from .txl import TransformerXL, TransformerXLConfig

__all__ = ["BACKBONES", "ClassifierConfig", "SequenceClassifier", "GPT", "LMOutput", "ModelConfig", "TransformerXL", "TransformerXLConfig", "build_model",
           "check_backbone", "model_config_from_dict"]
