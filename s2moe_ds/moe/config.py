"""The feed-forward blocks of a model: which kind, which router, how tokens are routed and how
the routers' losses count. The block kind and the router are separate choices, each resolved
through moe/registry.py, whose entries also bring the settings of their own (block_config,
router_config)."""

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..config import IMPLEMENTATION, ConfigError, check_choice, is_finite_number, require, resolve_settings
from .experts import EXPERT_IMPLEMENTATIONS
from .losses import LAYER_REDUCTIONS, LossTerm
from .registry import BLOCKS, ROUTERS
from .routing import BALANCE_COEF, check_routing

BLOCK_OF_OLD_ROUTER = {"s2moe": "s2moe", "smoe": "moe", "dense": "dense"}
"""Before the redesign of issue 11, moe.router named the block kind: its values and what they are now."""

SETTINGS = (("block", BLOCKS, "block_config"), ("router", ROUTERS, "router_config"))
"""The two choices whose registry entries bring settings of their own, and where MoEConfig keeps them."""


def settings_dict(value) -> Dict[str, Any]:
    """A block's or router's settings as a dict of fields, whether given as a dict or the dataclass."""
    if value is None:
        return {}
    return asdict(value) if is_dataclass(value) else dict(value)


def setting_owners(name: str) -> List[Tuple[str, str]]:
    """Where a field of that name lives: ('moe', '') for MoEConfig's own, ('block', kind) or
    ('router', name) for the settings of each registered block kind or router that has it."""
    owners = [("moe", "")] if name in {f.name for f in fields(MoEConfig)} - {s for _, _, s in SETTINGS} else []
    for what, registry, _ in SETTINGS:
        owners += [(what, key) for key, spec in registry.items()
                   if spec.config is not None and name in {f.name for f in fields(spec.config)}]
    return owners


def nest_settings(flat: Dict[str, Any], block: str, router: str, label=lambda name: name) -> Dict[str, Any]:
    """Flat {field: value} as MoEConfig's fields, with block_config and router_config for `block`
    and `router`. A field of another kind's or router's settings is refused, named by label(field)."""
    chosen = {"block": block, "router": router}
    out: Dict[str, Any] = {}
    for name, value in flat.items():
        owners = setting_owners(name)
        if ("moe", "") in owners:
            out[name] = value
            continue
        mine = [what for what, key in owners if chosen.get(what) == key]
        if not mine:
            if not owners:
                raise ConfigError(f"{label(name)}: not a field of MoEConfig nor of any block kind's or router's settings")
            what, key = owners[0]
            raise ConfigError(f"{label(name)}: is a setting of {what} {key!r}, but this run's moe.{what} is "
                              f"{chosen[what]!r}; drop it or pass --moe.{what} {key}")
        out.setdefault(f"{mine[0]}_config", {})[name] = value
    return out


@dataclass
class MoEConfig:
    """Which feed-forward block the model's MoE layers are, which router they use, and how."""

    block: str = "s2moe"
    """Block kind of the MoE layers: 'dense' (one FFN on every token), 'moe' (DeepSpeed's
    expert-parallel MoE, the SMoE baseline) or 's2moe' (S2MoE: the same router and experts on
    the clean and a noise-augmented copy of each token, mixed by a learned gate)."""
    router: str = "topk"
    """The router of 'moe' and 's2moe' blocks: 'topk' (DeepSpeed's top-k gate, made deterministic
    in eval mode and given eval_k), 'xmoe' (X-MoE's cosine routing on a low-dimensional sphere),
    'stablemoe' (StableMoE's two stages: learned then frozen routing by token), 'smoe_dropout'
    (SMoE-Dropout's fixed random router with a growing k), 'lossfree' (DeepSeek-V3's loss-free
    balancing: a per-expert bias, updated from the loads, picks the experts); docs/routers.md."""
    num_experts: int = 16
    """Experts per MoE layer, across all expert-parallel ranks."""
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
    balance_coef: float = BALANCE_COEF
    """Weight of the router's load-balancing loss in the total loss."""
    balance_over_layers: str = "sum"
    """How the MoE layers' balance losses are reduced into one term: 'sum' (DeepSpeed's
    convention, the default) or 'mean'."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss of ST-MoE (Zoph et al., 2022, "ST-MoE: Designing Stable and
    Transferable Sparse Expert Models"): the mean over tokens of logsumexp(router logits)^2, which
    keeps every router's logits small. 0 (the default) leaves it out: no 'z_loss' term, nothing
    computed. Reduced over the layers as balance_over_layers says. Under S2MoE it is taken, like
    the balance loss, over the one route of both paths: the clean tokens and their noisy copies.
    ST-MoE used 0.001."""
    router_config: Any = None
    """The router's own settings: its config class (moe/registry.py) or a dict of its fields;
    None gives its defaults."""
    block_config: Any = None
    """The block kind's own settings (S2MoEConfig for 's2moe'; 'dense' and 'moe' have none): the
    class or a dict of its fields; None gives its defaults."""
    expert_impl: str = field(default="loop", metadata=IMPLEMENTATION)
    """Implementation, not method (a run may resume with the other value): how a routed block
    computes its local experts. 'loop': DeepSpeed's, one FFN call per expert; 'batched': all of
    them in one batched matmul per linear layer (moe/experts.py BatchedExperts; the same weights,
    names and checkpoint files). Both the SMoE baseline and S2MoE take it."""

    def __post_init__(self) -> None:
        p = "moe."
        if self.router in BLOCK_OF_OLD_ROUTER and self.router not in ROUTERS:
            raise ConfigError(f"moe.router: {self.router!r} names a block kind; moe.router now names the router "
                              f"({', '.join(map(repr, ROUTERS))}) and moe.block the block kind: use block "
                              f"{BLOCK_OF_OLD_ROUTER[self.router]!r} (flag --moe.block)")
        check_choice(self.block, p + "block", tuple(BLOCKS))
        check_choice(self.router, p + "router", tuple(ROUTERS))
        check_routing(p, self.num_experts, self.k, self.eval_k, self.capacity_factor, self.eval_capacity_factor,
                      self.min_capacity, self.drop_tokens, self.eval_drop_tokens, self.balance_coef)
        check_choice(self.balance_over_layers, p + "balance_over_layers", LAYER_REDUCTIONS)
        require(is_finite_number(self.z_loss_coef) and self.z_loss_coef >= 0, p + "z_loss_coef",
                f"must be a finite number >= 0, got {self.z_loss_coef!r}; 0 turns the router z-loss off "
                "(ST-MoE used 0.001)")
        check_choice(self.expert_impl, p + "expert_impl", EXPERT_IMPLEMENTATIONS)
        self.router_config = resolve_settings(self.router_config, ROUTERS[self.router].config, p + "router_config",
                                              f"router {self.router!r}")
        self.block_config = resolve_settings(self.block_config, BLOCKS[self.block].config, p + "block_config",
                                             f"block {self.block!r}")
        BLOCKS[self.block].check(self)
        ROUTERS[self.router].check(self.router_config, self)

    @property
    def routed(self) -> bool:
        """True when the block kind routes tokens over experts (and so has a router and eval_k)."""
        return BLOCKS[self.block].routed

    @property
    def resolved_eval_k(self) -> int:
        return self.k if self.eval_k is None else self.eval_k

    def loss_terms(self) -> Dict[str, LossTerm]:
        """The named losses this block kind (and its router) report, with their coefficients and
        layer reductions."""
        terms = dict(BLOCKS[self.block].loss_terms(self))
        if self.routed:
            terms.update(ROUTERS[self.router].loss_terms(self.router_config, self))
            if self.z_loss_coef > 0:
                terms["z_loss"] = LossTerm(self.z_loss_coef, self.balance_over_layers)
        return terms

    def to_dict(self) -> dict:
        return asdict(self)
