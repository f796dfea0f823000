"""The architecture of a language model: backbone, sizes, and which layers are MoE blocks.
The parallel layout is not here (parallel/config.py): the same ModelConfig runs on any layout."""

from dataclasses import asdict, dataclass, field

from ..config import check_int, check_number, require
from ..moe import MoEConfig


@dataclass
class ModelConfig:
    """A Transformer language model whose feed-forward blocks are of moe.block's kind."""

    backbone: str = "gpt"
    """The backbone (models/registry.py): 'gpt', a pre-norm decoder with learned positions."""
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
    """Longest input segment (the size of the learned position table)."""
    dropout: float = 0.0
    """Dropout on attention, residual branches and inside experts."""
    moe_every: int = 1
    """The feed-forward block of every n-th layer is of moe.block's kind (1: all); the others are dense."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The feed-forward blocks' kind, router and routing settings."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        p = "model."
        # The backbone's name is checked against models/registry.py where a config meets it
        # (model_config_from_dict, build_model, ExperimentConfig).
        require(isinstance(self.backbone, str) and self.backbone != "", p + "backbone", "must name a backbone")
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
        check_int(self.moe_every, p + "moe_every", 1)
        require(isinstance(self.moe, MoEConfig), p + "moe", "must be a MoEConfig or a dict of its fields")

    def is_moe_layer(self, index: int) -> bool:
        """Layers moe_every-1, 2*moe_every-1, ... hold the MoE block (the last of each group)."""
        return self.moe.routed and (index + 1) % self.moe_every == 0

    def block_kind(self, index: int) -> str:
        """The feed-forward block kind of layer `index`."""
        return self.moe.block if self.is_moe_layer(index) else "dense"

    def to_dict(self) -> dict:
        return asdict(self)
