"""'s2moe': S2MoE (arXiv 2503.23007) on DeepSpeed's expert-parallel MoE layer.

Training forward, for the tokens x of this rank (docs/method.md):

    x_hat = GaussianNoise(x)                          the noisy copy (method/noise.py)
    [y, y_hat] = SMoE([x; x_hat])                     ONE dispatch: same router, same experts,
                                                      one all-to-all pair for both paths
    g = sigmoid(w^T x + b)                            the mixing gate, fp32, starts at 0.5
    out = g * y + (1 - g) * y_hat                     (method/mixing.py; fused: in DeepSpeed's combine,
                                                      each token's routes weighted by g, its copy's by 1 - g)
    L_u = InfoNCE(x, x_hat) on a token sample         (method/infonce.py)

Eval forward (eval_noise 'none'): out = SMoE(x) with eval_k experts, one dispatch, deterministic.
Ablations (S2MoEConfig): mix_gate_fixed (g a constant), noise_shift false (x_hat without mu) and the
lite form, noisy_dispatch false (out = SMoE(x) in training too; x_hat exists only for L_u).
use_residual=True (DeepSpeed's residual MoE): out = c0(x) * out + c1(x) * mlp(x), once, after the mix
(blocks/residual.py says why).
`S2MoEConfig.fused` picks the formulas of method/ or their autograd Functions in fused/.

The class subclasses `deepspeed.moe.layer.MoE`, so DeepSpeed's engine treats it as any MoE layer:
expert parameter groups for ZeRO 1/2, per-expert checkpoint files, process-group creation.
Shapes: T tokens of this rank, D = hidden size.
"""

import functools
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ...config import (IMPLEMENTATION, ConfigError, check_bool, check_choice, check_int, check_known_fields,
                       check_number, is_finite_number, require)
from ...parallel import check_expert_parallel
from ...parallel import deepspeed_internals as ds
from .. import fused, method
from ..losses import LAYER_REDUCTIONS, LossTerm
from ..routers.topk import TopKRouter, TopKRouterConfig
from ..routing import BALANCE_COEF, Routing, check_routing
from ..spec import BlockSpec
from .base import BlockOutput, ExpertBlock
from .moe import balance_term, deepspeed_moe_args
from .moe import flops as moe_flops
from .residual import residual_mix

NOISE_STATS = ("local", "global")
UNCERTAINTY_NEGATIVES = ("sampled", "global")
EVAL_NOISE = ("none", "mean", "sample")
UNCERTAINTY_ON = ("input", "output")


@dataclass
class S2MoEConfig:
    """The settings S2MoE adds to a MoE layer (docs/method.md has the method they configure)."""

    noise_scale: float = 1.0
    """s in N1 = 1 + s*sigma*eps1, N2 = mu + s*sigma*eps2; 0 gives x_hat = x + mu."""
    noise_shift: bool = True
    """Add the batch mean mu to the copy (the paper's N2 = mu + s*sigma*eps2). False: N2 =
    s*sigma*eps2, so x_hat = x + s*sigma*(eps1*x + eps2), a copy centred on its token (an
    ablation of issue 28's attribution study)."""
    noise_stats: str = "local"
    """Where mu and sigma come from: 'local' (this rank's tokens) or 'global' (all-reduced over the
    data-parallel group, like SyncBatchNorm)."""
    detach_noise_stats: bool = True
    """Treat mu and sigma as constants for autograd."""
    mix_gate_init_bias: float = 0.0
    """Initial bias b of the mixing gate g(x) = sigmoid(w^T x + b); w starts at 0, so g starts at
    sigmoid(b) (0.5 for the default)."""
    mix_gate_fixed: Optional[float] = None
    """None (the paper's): the learned gate g(x) above. A number in [0, 1]: g is that constant for
    every token and the layer has no gate parameters; 1 dispatches the noisy copies but mixes
    none of their output in, 0.5 averages the paths (ablations of issue 28's attribution study)."""
    noisy_dispatch: bool = True
    """True (the paper's): the noisy copies go through the router and the experts and are mixed
    in. False is the lite form: the copy exists only for the InfoNCE loss on the layer's input;
    the router and experts see the clean tokens alone, so a training step costs what SMoE's does
    plus the loss, and there is no mixing gate."""
    eval_noise: str = "none"
    """Noise in eval mode: 'none' (x_hat = x, one dispatch), 'mean' (x_hat = x + mu) or 'sample'
    (as in training)."""
    uncertainty_coef: float = 0.1
    """beta, the weight of the InfoNCE uncertainty loss L_u in the total loss."""
    uncertainty_tau: float = 0.1
    """InfoNCE temperature tau."""
    uncertainty_tokens: int = 512
    """Tokens sampled per layer per step for L_u; bounds its memory at tokens^2 instead of T^2."""
    uncertainty_similarity: str = "cosine"
    """The similarity InfoNCE compares a token and the copies with: 'cosine' (the paper's), 'dot'
    (the dot product) or 'neg_sq_distance' (minus the squared Euclidean distance); the last two
    see the features' scale, so they want another uncertainty_tau. Only the cosine has a fused
    implementation; the others always run the plain formula."""
    uncertainty_negatives: str = "sampled"
    """InfoNCE's negatives: 'sampled' (a sample of uncertainty_tokens tokens of this rank, each the
    others' negatives) or 'global' (every token against the copies of every token of the
    data-parallel group, gathered across ranks; the authors' sister code), computed in chunks of
    uncertainty_tokens anchors so that its memory stays uncertainty_tokens x the group's tokens.
    'global' runs the plain formula (no fused version)."""
    uncertainty_on: str = "input"
    """'input': InfoNCE between x and x_hat (the paper); 'output': between SMoE(x) and SMoE(x_hat)."""
    uncertainty_over_layers: str = "mean"
    """How the S2MoE layers' L_u are reduced into one term: 'mean' (the default) or 'sum'."""
    fused: bool = field(default=True, metadata=IMPLEMENTATION)
    """Implementation, not method (a run may resume with the other value): true runs the noisy concat, gate logit, path mix and InfoNCE as
    the autograd Functions of moe/fused, and mixes the paths inside DeepSpeed's combine where the
    dispatch allows it (same values and gradients to rounding, less memory); false runs the plain
    formulas of moe/method, the reference they are tested against."""

    def __post_init__(self) -> None:
        p = "s2moe."
        check_number(self.noise_scale, p + "noise_scale", 0.0, strict=False)
        check_bool(self.noise_shift, p + "noise_shift")
        check_bool(self.noisy_dispatch, p + "noisy_dispatch")
        if self.mix_gate_fixed is not None:
            require(is_finite_number(self.mix_gate_fixed) and 0.0 <= self.mix_gate_fixed <= 1.0,
                    p + "mix_gate_fixed", f"must be a number in [0, 1] or None (the learned gate), "
                    f"got {self.mix_gate_fixed!r}")
        check_choice(self.noise_stats, p + "noise_stats", NOISE_STATS)
        check_bool(self.detach_noise_stats, p + "detach_noise_stats")
        check_number(self.mix_gate_init_bias, p + "mix_gate_init_bias", float("-inf"), strict=True)
        require(abs(self.mix_gate_init_bias) < 1e4, p + "mix_gate_init_bias",
                f"must be a finite number, got {self.mix_gate_init_bias!r}")
        check_choice(self.eval_noise, p + "eval_noise", EVAL_NOISE)
        check_number(self.uncertainty_coef, p + "uncertainty_coef", 0.0, strict=False)
        check_number(self.uncertainty_tau, p + "uncertainty_tau", 0.0, strict=True)
        check_int(self.uncertainty_tokens, p + "uncertainty_tokens", 2)
        check_choice(self.uncertainty_similarity, p + "uncertainty_similarity", method.SIMILARITIES)
        check_choice(self.uncertainty_negatives, p + "uncertainty_negatives", UNCERTAINTY_NEGATIVES)
        check_choice(self.uncertainty_on, p + "uncertainty_on", UNCERTAINTY_ON)
        check_choice(self.uncertainty_over_layers, p + "uncertainty_over_layers", LAYER_REDUCTIONS)
        check_bool(self.fused, p + "fused")
        if not self.noisy_dispatch:
            self._check_lite(p)

    def _check_lite(self, p: str) -> None:
        """The lite form has one path: nothing to mix, no SMoE(x_hat) to compare or to evaluate."""
        fix = f"; drop it or set {p}noisy_dispatch true"
        require(self.mix_gate_fixed is None, p + "mix_gate_fixed",
                f"has no effect with {p}noisy_dispatch false (the lite form mixes no paths){fix}")
        require(self.uncertainty_on == "input", p + "uncertainty_on",
                f"must be 'input' with {p}noisy_dispatch false: no expert sees the copy, so there is no "
                f"SMoE(x_hat) to compare{fix}")
        require(self.eval_noise == "none", p + "eval_noise",
                f"must be 'none' with {p}noisy_dispatch false: the experts never see a noisy copy{fix}")

    @property
    def learned_gate(self) -> bool:
        """Whether the layer has the mixing gate's parameters (w, b)."""
        return self.noisy_dispatch and self.mix_gate_fixed is None


def _check_folding(uncertainty_coef: float, balance_coef: float, field: str) -> None:
    if uncertainty_coef > 0 and not balance_coef > 0:
        raise ConfigError(f"{field}: must be > 0 with block 's2moe': the layer's drop-in forward folds "
                          "uncertainty_coef / balance_coef * L_u into l_aux; set a small positive balance_coef or "
                          "s2moe.uncertainty_coef 0")


class S2MoE(ExpertBlock, ds.MoE):
    """S2MoE layer (arXiv 2503.23007) on DeepSpeed's MoE; a drop-in for `deepspeed.moe.layer.MoE`.

    The positional arguments and their defaults are DeepSpeed's MoE's, use_residual=True included:
    DeepSpeed's residual MoE with its `mlp` and `coefficient`, applied to the mixed output of the two
    paths (blocks/residual.py). Keyword-only extras:

    - eval_k: experts per token in eval mode (default: k).
    - eval_drop_tokens: drop tokens beyond capacity in eval mode (default: drop_tokens, as DeepSpeed).
    - balance_coef: the coefficient your training code multiplies l_aux by (default 0.01). The
      drop-in `forward` returns l_aux = L_balance + (uncertainty_coef / balance_coef) * L_u, so
      that `balance_coef * l_aux` adds exactly `uncertainty_coef * L_u` to the loss.
    - router: a function of no arguments that makes the router, called once after DeepSpeed's
      constructor (moe/registry.py's build_router makes any registered router from a MoEConfig);
      None: the 'topk' router with the arguments above as its config (moe/routing.py's Routing),
      starting from the weights of the gate DeepSpeed's constructor made.
    - any S2MoEConfig field (noise_scale, noise_stats, ..., fused).
    """

    kind = "s2moe"

    def __init__(self,
                 hidden_size: int,
                 expert: nn.Module,
                 num_experts: int = 1,
                 ep_size: int = 1,
                 k: int = 1,
                 capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0,
                 min_capacity: int = 4,
                 use_residual: bool = False,
                 noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True,
                 use_rts: bool = True,
                 use_tutel: bool = False,
                 enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True,
                 *,
                 eval_k: Optional[int] = None,
                 eval_drop_tokens: Optional[bool] = None,
                 balance_coef: float = BALANCE_COEF,
                 router: Optional[Callable[[], nn.Module]] = None,
                 **s2moe) -> None:
        # Validate everything before DeepSpeed's constructor, whose asserts name no field.
        if not (isinstance(hidden_size, int) and hidden_size >= 1):
            raise ConfigError(f"hidden_size: must be an integer >= 1, got {hidden_size!r}")
        if not isinstance(expert, nn.Module):
            raise ConfigError(f"expert: must be a torch.nn.Module, got {type(expert).__name__}")
        check_expert_parallel(num_experts, ep_size, "num_experts", "ep_size")
        # MoEConfig's routing checks and the top-k router's config, with the same messages.
        check_routing("moe.", num_experts, k, eval_k, capacity_factor, eval_capacity_factor, min_capacity, drop_tokens,
                      drop_tokens if eval_drop_tokens is None else eval_drop_tokens, balance_coef)
        TopKRouterConfig(noisy_gate_policy=noisy_gate_policy, use_rts=use_rts,
                         top2_2nd_expert_sampling=top2_2nd_expert_sampling)
        check_known_fields(s2moe, S2MoEConfig, "S2MoE",
                           "S2MoE's keyword arguments (eval_k, eval_drop_tokens, balance_coef, router and these)")
        self.config = S2MoEConfig(**s2moe)
        _check_folding(self.config.uncertainty_coef, balance_coef, "balance_coef")
        super().__init__(hidden_size, expert, num_experts, ep_size, k, capacity_factor, eval_capacity_factor,
                         min_capacity, use_residual, noisy_gate_policy, drop_tokens, use_rts, use_tutel,
                         enable_expert_tensor_parallelism, top2_2nd_expert_sampling)
        self.balance_coef = balance_coef
        routing = Routing(num_experts, k, k if eval_k is None else eval_k, capacity_factor, eval_capacity_factor,
                          min_capacity, drop_tokens, drop_tokens if eval_drop_tokens is None else eval_drop_tokens,
                          noisy_gate_policy, use_rts, top2_2nd_expert_sampling)
        self.install_router(router() if router is not None else TopKRouter(hidden_size, routing))
        cfg = self.config
        self.noise = method.GaussianNoise(cfg.noise_scale, cfg.noise_stats, cfg.detach_noise_stats)
        self.negatives_group = None  # the data-parallel group, once DeepSpeed sets the layout
        # Named without "expert": DeepSpeed moves every state-dict key containing that word into
        # the per-expert checkpoint files. A fixed gate or the lite form has no parameters to learn.
        self.mix_gate = nn.Linear(hidden_size, 1) if cfg.learned_gate else None
        self.reset_block_parameters()
        ds.enable_pair_dispatch(self)

    @property
    def eval_k(self) -> int:
        return self.router.eval_k

    def reset_block_parameters(self) -> None:
        """w = 0 and b = mix_gate_init_bias, so g(x) starts at sigmoid(b) for every token."""
        if self.mix_gate is None:
            return
        nn.init.zeros_(self.mix_gate.weight)
        nn.init.constant_(self.mix_gate.bias, self.config.mix_gate_init_bias)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        if self.config.noise_stats == "global":
            # Statistics are shared by the ranks that share the non-expert weights, as SyncBatchNorm
            # shares them across its data-parallel group.
            self.noise.stats_group = ds.data_parallel_group()
        if self.config.uncertainty_negatives == "global":
            self.negatives_group = ds.data_parallel_group()

    def mixes_in_combine(self) -> bool:
        """Whether training mixes the two paths inside DeepSpeed's combine (the fused path, where
        nothing needs either path's own output and the dispatch is the plain one) instead of
        after it (mix_paths)."""
        cfg = self.config
        return cfg.fused and cfg.uncertainty_on == "input" and ds.can_pair(self)

    def _uses_noise(self) -> bool:
        return self.training or self.config.eval_noise != "none"

    def _dispatches_noise(self) -> bool:
        return self._uses_noise() and self.config.noisy_dispatch

    def gate(self, x_TD: torch.Tensor) -> torch.Tensor:
        """g per token, [T, 1] fp32: the learned sigmoid(w^T x + b) or the configured constant."""
        if self.mix_gate is None:
            return torch.full((x_TD.shape[0], 1), self.config.mix_gate_fixed, dtype=torch.float32, device=x_TD.device)
        ops = fused if self.config.fused else method
        return torch.sigmoid(ops.mix_gate_logit(x_TD, self.mix_gate.weight, self.mix_gate.bias))

    def _copy_statistics(self, x_TD: torch.Tensor, mask_T: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the shift, sigma) of the copy: mu, or zeros without the batch-mean shift."""
        mu_D, sigma_D = self.noise.statistics(x_TD, mask_T)
        return (mu_D if self.config.noise_shift else torch.zeros_like(mu_D)), sigma_D

    def noisy_copy(self, x_TD: torch.Tensor, mask_T: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_hat alone, sampled (the lite form's: no [x; x_hat] buffer, since nothing dispatches it)."""
        mu_D, sigma_D = self._copy_statistics(x_TD, mask_T)
        if self.noise.noise_scale == 0:
            return method.expected_copy(x_TD, mu_D)
        return method.noisy_copy(x_TD, mu_D, self.noise.noise_scale * sigma_D, *method.draw_eps(x_TD))

    def noisy_pair(self, x_TD: torch.Tensor, mask_T: Optional[torch.Tensor] = None,
                   sample: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """([x; x_hat] along the token axis, x_hat): both paths in one buffer for one dispatch.
        The fused Function covers sampled noise with constant statistics; the rest is plain."""
        noise = self.noise
        mu_D, sigma_D = self._copy_statistics(x_TD, mask_T)
        if not sample or noise.noise_scale == 0:
            x_hat_TD = method.expected_copy(x_TD, mu_D)
            return torch.cat([x_TD, x_hat_TD], dim=0), x_hat_TD
        concat = fused.noisy_concat if self.config.fused and noise.detach_noise_stats else method.noisy_concat
        return concat(x_TD, mu_D, noise.noise_scale * sigma_D, *method.draw_eps(x_TD))

    def forward_parts(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None,
                      token_ids: Optional[torch.Tensor] = None) -> BlockOutput:
        """hidden_states: [..., hidden_size]; used_token: optional [...] mask, 1 for real tokens and 0
        for padding (padding is left out of the noise statistics and of L_u; top-1 routing also
        leaves it out, as in DeepSpeed); token_ids: optional [...] ids, for routers that route by
        token (a noisy copy keeps its token's id). Losses: 'balance', 'uncertainty' (0 in eval)
        and the router's own."""
        cfg = self.config
        ops = fused if cfg.fused else method
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        # fp32, never the activations' dtype: DeepSpeed's top-1 gate counts capacity slots in the
        # mask's dtype, and bf16 holds whole numbers exactly only up to 256.
        mask_T = None if used_token is None else used_token.reshape(-1).to(torch.float32)
        ids_T = None if token_ids is None else token_ids.reshape(-1)
        uncertainty = x_TD.new_zeros((), dtype=torch.float32)
        extra = {}

        if not self._dispatches_noise():
            # Eval: x_hat = x, so g * SMoE(x) + (1 - g) * SMoE(x) = SMoE(x): one dispatch, no gate.
            # The lite form: the experts never see the copy, which exists for L_u alone.
            route = self.route(x_TD, mask_T, ids_T)
            out_TD = self.dispatch_and_combine(x_TD, route)
            if self.training and cfg.uncertainty_coef > 0:
                x_hat_TD = self.noisy_copy(x_TD, mask_T)
                uncertainty = self.uncertainty(x_TD, x_hat_TD, mask_T)
        else:
            # Clean tokens first: DeepSpeed drops routes by position when an expert is full, so
            # the clean path (the one evaluation uses) keeps priority over the noisy copy.
            both_2TD, x_hat_TD = self.noisy_pair(x_TD, mask_T, sample=self.training or cfg.eval_noise == "sample")
            both_mask = None if mask_T is None else torch.cat([mask_T, mask_T], dim=0)
            both_ids = None if ids_T is None else torch.cat([ids_T, ids_T], dim=0)
            g_T1 = self.gate(x_TD)
            route = self.route(both_2TD, both_mask, both_ids)  # one route for both paths
            if self.mixes_in_combine():
                # The mix inside DeepSpeed's combine: each token's output sums its clean routes
                # weighted by g and its copy's by 1 - g, so neither path's [T, D] output exists.
                out_TD = self.dispatch_and_combine(both_2TD, route,
                                                   pair_weight_2T=torch.cat([g_T1, 1.0 - g_T1]).reshape(-1))
            else:
                y_2TD = self.dispatch_and_combine(both_2TD, route)
                y_TD, y_hat_TD = y_2TD.chunk(2, dim=0)
                out_TD = ops.mix_paths(g_T1, y_2TD)
            if self.training and cfg.uncertainty_coef > 0:
                pair = (x_TD, x_hat_TD) if cfg.uncertainty_on == "input" else (y_TD, y_hat_TD)
                uncertainty = self.uncertainty(*pair, mask_T)
            extra["mix_gate"] = g_T1.detach().reshape(-1)

        out = out_TD.reshape(hidden_states.shape)
        if self.use_residual:  # DeepSpeed's constructor made mlp and coefficient
            out = residual_mix(self.mlp, self.coefficient, hidden_states, out)
        return BlockOutput(out, {**route.losses, "uncertainty": uncertainty}, {**extra, **route.metrics})

    def uncertainty(self, a_TD: torch.Tensor, b_TD: torch.Tensor, mask_T: Optional[torch.Tensor]) -> torch.Tensor:
        """L_u, InfoNCE between each token of a and its copy in b, with the configured negatives."""
        cfg = self.config
        if cfg.uncertainty_negatives == "global":
            return method.gathered_info_nce(a_TD, b_TD, cfg.uncertainty_tau, cfg.uncertainty_tokens, mask_T,
                                            cfg.uncertainty_similarity, self.negatives_group)
        loss = ((fused if cfg.fused else method).info_nce if cfg.uncertainty_similarity == "cosine" else
                functools.partial(method.info_nce, kind=cfg.uncertainty_similarity))
        return method.sampled_info_nce(a_TD, b_TD, cfg.uncertainty_tau, cfg.uncertainty_tokens, mask_T, loss=loss)

    def forward(self,
                hidden_states: torch.Tensor,
                used_token: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DeepSpeed MoE's interface: (output, l_aux, exp_counts).

        l_aux = L_balance + (uncertainty_coef / balance_coef) * L_u, so code written for DeepSpeed's
        MoE (`loss = task_loss + balance_coef * l_aux`) trains S2MoE with both losses weighted as
        configured.
        """
        parts = self.forward_parts(hidden_states, used_token)
        l_aux = parts.losses["balance"]
        if self.config.uncertainty_coef > 0 and self.training:
            l_aux = l_aux + (self.config.uncertainty_coef / self.balance_coef) * parts.losses["uncertainty"]
        return parts.output, l_aux, parts.metrics["expert_counts"]

    def analysis_extras(self, x_ND: torch.Tensor):
        if not self.config.noisy_dispatch:
            return {}
        if self.mix_gate is None:
            return {"mix_gate": self.gate(x_ND).reshape(-1)}
        g_N1 = torch.sigmoid(method.mix_gate_logit(x_ND, self.mix_gate.weight, self.mix_gate.bias))
        return {"mix_gate": g_N1.reshape(-1)}


def build(moe_cfg, d_model: int, expert, ep_size: int, router) -> S2MoE:
    return S2MoE(d_model, expert, ep_size=ep_size, **deepspeed_moe_args(moe_cfg), eval_k=moe_cfg.resolved_eval_k,
                 eval_drop_tokens=moe_cfg.eval_drop_tokens, balance_coef=moe_cfg.balance_coef, router=router,
                 **asdict(moe_cfg.block_config))


def loss_terms(moe_cfg):
    cfg = moe_cfg.block_config
    return {**balance_term(moe_cfg), "uncertainty": LossTerm(cfg.uncertainty_coef, cfg.uncertainty_over_layers)}


def flops(moe_cfg, d_model: int, d_inner: int, experts_per_token: int, training: bool, router_flops: int):
    """In training the router and the experts see the clean and the noisy copy, and the mixing gate
    runs (the lite form: the clean tokens only, no gate); in eval only the clean tokens, as any MoE."""
    cfg = moe_cfg.block_config
    paths = 2 if training and cfg.noisy_dispatch else 1
    out = {name: paths * v
           for name, v in moe_flops(moe_cfg, d_model, d_inner, experts_per_token, training, router_flops).items()}
    out["mix_gate"] = 2 * d_model if training and cfg.learned_gate else 0
    return out


def check(moe_cfg) -> None:
    _check_folding(moe_cfg.block_config.uncertainty_coef, moe_cfg.balance_coef, "moe.balance_coef")


SPEC = BlockSpec(build=build, config=S2MoEConfig, routed=True, loss_terms=loss_terms, flops=flops, check=check)
