"""The architecture of a language model: backbone, sizes, and which layers are MoE blocks.
The parallel layout is not here (parallel/config.py): the same ModelConfig runs on any layout."""

from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import check_choice, check_int, check_number, require, resolve_settings
from ..moe import MoEConfig
from ..moe.experts import ACTIVATIONS
from .registry import BACKBONES, check_backbone


@dataclass
class ModelConfig:
    """A Transformer language model whose feed-forward blocks are of moe.block's kind."""

    backbone: str = "gpt"
    """The backbone (models/registry.py): 'gpt', a pre-norm decoder with learned positions and no
    memory, or 'txl', Transformer-XL (relative positions, a memory of earlier segments; the paper's)."""
    backbone_config: Any = None
    """The backbone's own settings: its config class (models/registry.py) or a dict of its fields;
    None means its defaults."""
    vocab_size: int = 256
    """Tokenizer vocabulary size (the launcher sets it from the tokenizer)."""
    n_layer: int = 2
    """Transformer blocks."""
    d_model: int = 64
    """Hidden size."""
    n_head: int = 4
    """Attention heads; must divide d_model."""
    d_inner: int = 128
    """Hidden size of each expert's (and the dense) feed-forward network."""
    max_seq_len: int = 64
    """Longest input segment ('gpt': the size of its learned position table)."""
    dropout: float = 0.0
    """Dropout on attention, residual branches and inside experts."""
    activation: str = "gelu"
    """Activation of the dense and expert FFNs: 'gelu' or 'relu' (Transformer-XL's and the
    authors' sister code's)."""
    moe_every: int = 1
    """The feed-forward block of every n-th layer is of moe.block's kind (1: all); the others are dense."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The feed-forward blocks' kind, router and routing settings."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        p = "model."
        check_backbone(self.backbone)
        self.backbone_config = resolve_settings(self.backbone_config, BACKBONES[self.backbone].settings,
                                                p + "backbone_config", f"backbone {self.backbone!r}")
        check_int(self.vocab_size, p + "vocab_size", 2)
        check_int(self.n_layer, p + "n_layer", 1)
        check_int(self.d_model, p + "d_model", 1)
        check_int(self.n_head, p + "n_head", 1)
        require(self.d_model % self.n_head == 0, p + "n_head",
                f"must divide model.d_model (got n_head={self.n_head}, d_model={self.d_model})")
        check_int(self.d_inner, p + "d_inner", 1)
        check_int(self.max_seq_len, p + "max_seq_len", 1)
        check_number(self.dropout, p + "dropout", 0.0, strict=False)
        require(self.dropout < 1, p + "dropout", f"must be < 1, got {self.dropout}")
        check_choice(self.activation, p + "activation", tuple(ACTIVATIONS))
        check_int(self.moe_every, p + "moe_every", 1)
        require(isinstance(self.moe, MoEConfig), p + "moe", "must be a MoEConfig or a dict of its fields")
        BACKBONES[self.backbone].check(self)

    def is_moe_layer(self, index: int) -> bool:
        """Layers moe_every-1, 2*moe_every-1, ... hold the MoE block (the last of each group)."""
        return self.moe.routed and (index + 1) % self.moe_every == 0

    def block_kind(self, index: int) -> str:
        """The feed-forward block kind of layer `index`."""
        return self.moe.block if self.is_moe_layer(index) else "dense"

    @property
    def has_memory(self) -> bool:
        """The model carries state across segments: training reads ordered streams, evaluation keeps it."""
        return BACKBONES[self.backbone].memory(self)

    def to_dict(self) -> dict:
        return asdict(self)


def model_config_from_dict(d: dict) -> ModelConfig:
    """The model config a checkpoint or run record stores."""
    return ModelConfig(**d)
