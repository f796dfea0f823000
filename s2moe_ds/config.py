"""Configuration dataclasses, one per concern, each validated in ``__post_init__``.

Every error names the field (``moe.s2moe.noise_scale``) and says how to fix it, so a bad flag or
config file fails before any compute. The defaults here are the single source for the S2MoE
defaults of ``METHOD.md``: the layer, the factory and the launch scripts all read them from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _fail(name: str, message: str) -> None:
    raise ConfigError(f"{name}: {message}")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        _fail(name, message)


def _check_choice(value, name: str, choices) -> None:
    _require(value in choices, name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_bool(value, name: str) -> None:
    _require(isinstance(value, bool), name, f"must be true or false, got {value!r}")


def _check_int(value, name: str, minimum: int) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, name,
             f"must be an integer >= {minimum}, got {value!r}")


def _check_number(value, name: str, minimum: float, strict: bool) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number and (value > minimum if strict else value >= minimum) and value == value
    _require(ok, name, f"must be a number {'>' if strict else '>='} {minimum}, got {value!r}")


NOISE_STATS = ("local", "global")
EVAL_NOISE = ("none", "mean", "sample")
UNCERTAINTY_ON = ("input", "output")
ROUTERS = ("s2moe", "smoe", "dense")
NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")


@dataclass
class S2MoEConfig:
    """The fields S2MoE adds to a DeepSpeed MoE layer (METHOD.md)."""

    noise_scale: float = 1.0
    """s in N1 = 1 + s*sigma*eps1, N2 = mu + s*sigma*eps2; 0 gives x_hat = x + mu."""
    noise_stats: str = "local"
    """Where mu and sigma come from: 'local' (this rank's tokens) or 'global' (all-reduced over the
    data-parallel group, like SyncBatchNorm)."""
    detach_noise_stats: bool = True
    """Treat mu and sigma as constants for autograd."""
    mix_gate_init_bias: float = 0.0
    """Initial bias b of the mixing gate g(x) = sigmoid(w^T x + b); w starts at 0, so g starts at
    sigmoid(b) (0.5 for the default)."""
    eval_noise: str = "none"
    """Noise in eval mode: 'none' (x_hat = x, one dispatch), 'mean' (x_hat = x + mu) or 'sample'
    (as in training)."""
    uncertainty_coef: float = 0.1
    """beta, the weight of the InfoNCE uncertainty loss L_u in the total loss."""
    uncertainty_tau: float = 0.1
    """InfoNCE temperature tau."""
    uncertainty_tokens: int = 512
    """Tokens sampled per layer per step for L_u; bounds its memory at tokens^2 instead of T^2."""
    uncertainty_on: str = "input"
    """'input': InfoNCE between x and x_hat (the paper); 'output': between SMoE(x) and SMoE(x_hat)."""

    def __post_init__(self) -> None:
        p = "s2moe."
        _check_number(self.noise_scale, p + "noise_scale", 0.0, strict=False)
        _check_choice(self.noise_stats, p + "noise_stats", NOISE_STATS)
        _check_bool(self.detach_noise_stats, p + "detach_noise_stats")
        _check_number(self.mix_gate_init_bias, p + "mix_gate_init_bias", float("-inf"), strict=True)
        _require(abs(self.mix_gate_init_bias) < 1e4, p + "mix_gate_init_bias",
                 f"must be a finite number, got {self.mix_gate_init_bias!r}")
        _check_choice(self.eval_noise, p + "eval_noise", EVAL_NOISE)
        _check_number(self.uncertainty_coef, p + "uncertainty_coef", 0.0, strict=False)
        _check_number(self.uncertainty_tau, p + "uncertainty_tau", 0.0, strict=True)
        _check_int(self.uncertainty_tokens, p + "uncertainty_tokens", 2)
        _check_choice(self.uncertainty_on, p + "uncertainty_on", UNCERTAINTY_ON)


@dataclass
class MoEConfig:
    """Which feed-forward block to build and how it routes (the factory's input)."""

    router: str = "s2moe"
    """'s2moe' (this project's layer), 'smoe' (DeepSpeed's own MoE) or 'dense' (a plain FFN)."""
    num_experts: int = 16
    """Experts per MoE layer, across all expert-parallel ranks."""
    ep_size: int = 1
    """Expert-parallel ranks per layer; each holds num_experts / ep_size experts."""
    k: int = 2
    """Experts per token (per path, for S2MoE) in training."""
    eval_k: Optional[int] = None
    """Experts per token in eval mode; None means k. The paper evaluates S2MoE with 1."""
    capacity_factor: float = 1.0
    """DeepSpeed's training capacity factor (capacity = ceil(S / E * factor * k))."""
    eval_capacity_factor: float = 1.0
    """DeepSpeed's capacity factor in eval mode."""
    min_capacity: int = 4
    """Minimum tokens per expert regardless of the capacity factor."""
    drop_tokens: bool = True
    """Drop tokens beyond capacity in training (False means unbounded capacity)."""
    eval_drop_tokens: bool = False
    """Drop tokens beyond capacity in eval mode. Off by default, unlike DeepSpeed: with drops a
    token's output depends on the other tokens of its batch, so metrics would change with batch
    size and process count."""
    noisy_gate_policy: Optional[str] = None
    """DeepSpeed's router noise in training: None, 'Jitter' or 'RSample' (never applied in eval)."""
    use_rts: bool = True
    """DeepSpeed's random token selection for top-1 in training (never applied in eval)."""
    top2_2nd_expert_sampling: bool = True
    """DeepSpeed's Gumbel sampling of the second expert in training (never applied in eval)."""
    balance_coef: float = 0.01
    """Weight of the load-balancing loss; the coefficient training multiplies l_aux by."""
    s2moe: S2MoEConfig = field(default_factory=S2MoEConfig)
    """The S2MoE fields; ignored by the 'smoe' and 'dense' routers."""

    def __post_init__(self) -> None:
        if isinstance(self.s2moe, dict):
            self.s2moe = S2MoEConfig(**self.s2moe)
        p = "moe."
        _check_choice(self.router, p + "router", ROUTERS)
        _check_int(self.num_experts, p + "num_experts", 1)
        _check_int(self.ep_size, p + "ep_size", 1)
        _require(self.num_experts % self.ep_size == 0, p + "num_experts",
                 f"must be divisible by moe.ep_size (got num_experts={self.num_experts}, "
                 f"ep_size={self.ep_size}); each expert-parallel rank holds num_experts / ep_size experts")
        check_top_k(self.k, self.num_experts, p + "k")
        if self.eval_k is not None:
            check_top_k(self.eval_k, self.num_experts, p + "eval_k")
        _check_number(self.capacity_factor, p + "capacity_factor", 0.0, strict=True)
        _check_number(self.eval_capacity_factor, p + "eval_capacity_factor", 0.0, strict=True)
        _check_int(self.min_capacity, p + "min_capacity", 0)
        _check_bool(self.drop_tokens, p + "drop_tokens")
        _check_bool(self.eval_drop_tokens, p + "eval_drop_tokens")
        _check_choice(self.noisy_gate_policy, p + "noisy_gate_policy", NOISY_GATE_POLICIES)
        _check_bool(self.use_rts, p + "use_rts")
        _check_bool(self.top2_2nd_expert_sampling, p + "top2_2nd_expert_sampling")
        _check_number(self.balance_coef, p + "balance_coef", 0.0, strict=False)
        _require(isinstance(self.s2moe, S2MoEConfig), p + "s2moe",
                 f"must be an S2MoEConfig or a dict of its fields, got {type(self.s2moe).__name__}")
        if self.router == "s2moe" and self.s2moe.uncertainty_coef > 0:
            _require(self.balance_coef > 0, p + "balance_coef",
                     "must be > 0 with router 's2moe': the layer folds uncertainty_coef / balance_coef "
                     "* L_u into l_aux; set a small positive balance_coef or s2moe.uncertainty_coef 0")

    @property
    def resolved_eval_k(self) -> int:
        return self.k if self.eval_k is None else self.eval_k

    def to_dict(self) -> dict:
        return asdict(self)


def check_top_k(k, num_experts: int, name: str) -> None:
    """k experts per token: an integer in [1, num_experts]."""
    _check_int(k, name, 1)
    _require(k <= num_experts, name, f"must be <= num_experts ({num_experts}), got {k}")


@dataclass
class ModelConfig:
    """A decoder-only Transformer whose feed-forward blocks are S2MoE, SMoE or dense."""

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
    """Longest sequence (learned position embeddings)."""
    dropout: float = 0.0
    """Dropout on attention, residual branches and inside experts."""
    moe_every: int = 1
    """Feed-forward block of every n-th layer is moe.router (1: all); the others are dense FFNs."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The feed-forward block's router and its settings."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        p = "model."
        _check_int(self.vocab_size, p + "vocab_size", 2)
        _check_int(self.n_layer, p + "n_layer", 1)
        _check_int(self.d_model, p + "d_model", 1)
        _check_int(self.n_head, p + "n_head", 1)
        _require(self.d_model % self.n_head == 0, p + "n_head",
                 f"must divide model.d_model (got n_head={self.n_head}, d_model={self.d_model})")
        _check_int(self.d_inner, p + "d_inner", 1)
        _check_int(self.max_seq_len, p + "max_seq_len", 1)
        _check_number(self.dropout, p + "dropout", 0.0, strict=False)
        _require(self.dropout < 1, p + "dropout", f"must be < 1, got {self.dropout}")
        _check_int(self.moe_every, p + "moe_every", 1)
        _require(isinstance(self.moe, MoEConfig), p + "moe", "must be a MoEConfig or a dict of its fields")

    def is_moe_layer(self, index: int) -> bool:
        """Layers moe_every-1, 2*moe_every-1, ... hold the MoE block (the last of each group)."""
        return self.moe.router != "dense" and (index + 1) % self.moe_every == 0

    def to_dict(self) -> dict:
        return asdict(self)


MODEL_PRESETS = {
    # Seconds per step on 2 CPU cores: for tests and the README demo.
    "tiny": dict(n_layer=2, d_model=64, n_head=4, d_inner=128, max_seq_len=64, dropout=0.0,
                 moe=dict(num_experts=4, k=2)),
    # The paper's small setting (METHOD.md): 4 layers, d_model 256, 8 heads, d_inner 512, 16 experts top-2.
    "paper-small": dict(n_layer=4, d_model=256, n_head=8, d_inner=512, max_seq_len=512, dropout=0.1,
                        moe=dict(num_experts=16, k=2)),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig from a named preset; `overrides` replace fields (moe fields via moe=dict(...))."""
    _check_choice(name, "model.preset", tuple(MODEL_PRESETS))
    base = {k: (dict(v) if isinstance(v, dict) else v) for k, v in MODEL_PRESETS[name].items()}
    moe = {**base.pop("moe"), **overrides.pop("moe", {})}
    return ModelConfig(**{**base, **overrides}, moe=moe)


@dataclass
class TrainConfig:
    """The training loop. Batch sizes, precision, ZeRO, clipping and the optimizer live in the
    DeepSpeed config; this holds what DeepSpeed does not know."""

    out_dir: str = "runs/tiny"
    """Run folder: checkpoints/, tensorboard/, run_config.json."""
    max_steps: int = 200
    """Optimizer steps (each of gradient_accumulation_steps micro-batches)."""
    seq_len: int = 64
    """Tokens per training sequence; at most model.max_seq_len."""
    lr: Optional[float] = None
    """Peak learning rate; None keeps the DeepSpeed config's optimizer.params.lr."""
    warmup_steps: int = 20
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio at max_steps."""
    eval_interval: int = 50
    """Evaluate on the validation split every n steps (and at the end); 0 disables."""
    eval_max_batches: Optional[int] = None
    """Cap on validation batches per rank; None evaluates the full split."""
    save_interval: int = 100
    """Checkpoint every n steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    log_interval: int = 10
    """TensorBoard scalars every n steps."""
    seed: int = 1234
    """Seed of weights, data order and noise."""
    resume: bool = False
    """Continue from out_dir/checkpoints/latest."""
    expect_world_size: Optional[int] = None
    """Refuse to start unless exactly this many processes joined (cluster scripts pass the task count)."""
    save_on_signal: bool = True
    """On SIGUSR1 (SLURM's pre-timeout signal) or SIGTERM (preemption), finish the step, checkpoint
    and exit with status 75 (EXIT_REQUEUE) so that the job script requeues the run."""
    stop_after: Optional[int] = None
    """End this invocation (with a checkpoint) at this step, as a scheduler time slice would; the
    learning-rate schedule still spans max_steps, and --resume continues exactly."""

    def __post_init__(self) -> None:
        p = "train."
        _require(isinstance(self.out_dir, str) and self.out_dir != "", p + "out_dir", "must be a folder path")
        _check_int(self.max_steps, p + "max_steps", 1)
        _check_int(self.seq_len, p + "seq_len", 1)
        if self.lr is not None:
            _check_number(self.lr, p + "lr", 0.0, strict=True)
        _check_int(self.warmup_steps, p + "warmup_steps", 0)
        _check_number(self.min_lr_ratio, p + "min_lr_ratio", 0.0, strict=False)
        _require(self.min_lr_ratio <= 1, p + "min_lr_ratio", f"must be <= 1, got {self.min_lr_ratio}")
        _check_int(self.eval_interval, p + "eval_interval", 0)
        if self.eval_max_batches is not None:
            _check_int(self.eval_max_batches, p + "eval_max_batches", 1)
        _check_int(self.save_interval, p + "save_interval", 0)
        _check_int(self.keep_checkpoints, p + "keep_checkpoints", 1)
        _check_int(self.log_interval, p + "log_interval", 1)
        _check_int(self.seed, p + "seed", 0)
        _check_bool(self.resume, p + "resume")
        if self.expect_world_size is not None:
            _check_int(self.expect_world_size, p + "expect_world_size", 1)
        _check_bool(self.save_on_signal, p + "save_on_signal")
        if self.stop_after is not None:
            _check_int(self.stop_after, p + "stop_after", 1)

    def to_dict(self) -> dict:
        return asdict(self)
