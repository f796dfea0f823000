"""S2MoE: DeepSpeed's expert-parallel MoE layer with a noise-augmented second path.

Training forward, for the tokens x of this rank:

    x_hat = GaussianNoise(x)                          the noisy copy (noise.py)
    [y, y_hat] = SMoE([x; x_hat])                     ONE dispatch: same router, same experts,
                                                      one all-to-all pair for both paths
    g = sigmoid(w^T x + b)                            the mixing gate, fp32, starts at 0.5
    out = g * y + (1 - g) * y_hat
    L_u = InfoNCE(x, x_hat) on a token sample         (uncertainty.py)

Eval forward (eval_noise 'none'): out = SMoE(x) with eval_k experts, one dispatch, deterministic.

The class subclasses `deepspeed.moe.layer.MoE`, so DeepSpeed's engine treats it as any MoE layer:
expert parameter groups for ZeRO 1/2, per-expert checkpoint files, process-group creation.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from ..config import ConfigError, MoEConfig, S2MoEConfig
from .gate import install_eval_deterministic_gate
from .noise import GaussianNoise
from .uncertainty import sampled_info_nce

_S2 = S2MoEConfig  # the defaults below are read from the config dataclass, their one home


class _MixPaths(torch.autograd.Function):
    """g * y + (1 - g) * y_hat from the [2T, D] expert output, computed in fp32 as
    y_hat + g * (y - y_hat).

    It keeps y - y_hat (one [T, D]) for the gradient of g where the plain graph keeps y and y_hat
    (the whole [2T, D] output), and its backward writes the gradients of both halves straight into
    one [2T, D] buffer instead of concatenating two.
    """

    @staticmethod
    def forward(ctx, g_T1: torch.Tensor, y_2TD: torch.Tensor) -> torch.Tensor:
        y_TD, y_hat_TD = y_2TD.chunk(2, dim=0)
        y_hat32_TD = y_hat_TD.float()
        diff32_TD = y_TD.float() - y_hat32_TD
        ctx.save_for_backward(g_T1, diff32_TD)
        return torch.addcmul(y_hat32_TD, diff32_TD, g_T1).to(y_2TD.dtype)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        g_T1, diff32_TD = ctx.saved_tensors
        T = grad_TD.shape[0]
        grad32_TD = grad_TD.float()
        grad_2TD = grad_TD.new_empty((2 * T, ) + tuple(grad_TD.shape[1:]))
        grad_2TD[:T].copy_(grad32_TD * g_T1)
        grad_2TD[T:].copy_(grad32_TD * (1.0 - g_T1))
        grad_g_T1 = (grad32_TD * diff32_TD).sum(-1, keepdim=True)
        return grad_g_T1, grad_2TD


class _GateLogit(torch.autograd.Function):
    """w^T x + b in fp32 for x of any dtype, keeping x itself for backward: the plain
    F.linear(x.float(), ...) keeps x's fp32 copy, twice the bytes of a bf16 x. Casting bf16 to
    fp32 is exact, so the gradients are the plain ones."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, weight_1D: torch.Tensor, bias_1: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, weight_1D)
        ctx.bias_dtype = bias_1.dtype
        return F.linear(x_TD.float(), weight_1D.float(), bias_1.float())

    @staticmethod
    def backward(ctx, grad_T1: torch.Tensor):
        x_TD, weight_1D = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_T1 @ weight_1D.float()).to(x_TD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_T1.t() @ x_TD.float()).to(weight_1D.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_T1.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b


def mix_gate_logit(x_TD: torch.Tensor, weight_1D: torch.Tensor, bias_1: torch.Tensor,
                   fused: bool = True) -> torch.Tensor:
    """The mixing gate's logit w^T x + b in fp32; fused=False is the plain graph (the reference)."""
    if fused:
        return _GateLogit.apply(x_TD, weight_1D, bias_1)
    return F.linear(x_TD.float(), weight_1D.float(), bias_1.float())


def mix_paths(g_T1: torch.Tensor, y_2TD: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """g * y + (1 - g) * y_hat for y_2TD = [y; y_hat], in fp32, returned in y's dtype; fused=False
    is the plain autograd graph, kept as the reference."""
    if fused:
        return _MixPaths.apply(g_T1, y_2TD)
    y_TD, y_hat_TD = y_2TD.chunk(2, dim=0)
    return (g_T1 * y_TD.float() + (1.0 - g_T1) * y_hat_TD.float()).to(y_2TD.dtype)


@dataclass
class S2MoEOutput:
    """Everything one S2MoE forward produces, losses kept apart (see S2MoE.forward_parts)."""

    output: torch.Tensor
    """Same shape and dtype as the input."""
    balance_loss: torch.Tensor
    """DeepSpeed's load-balancing loss over the routed tokens (both paths in training)."""
    uncertainty_loss: torch.Tensor
    """InfoNCE L_u, fp32; zero in eval mode and when uncertainty_coef is 0."""
    exp_counts: torch.Tensor
    """Routes per expert on this rank before capacity drops, both paths in training."""
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached values for logging (see S2MoE.last_metrics)."""


class S2MoE(MoE):
    """S2MoE layer (arXiv 2503.23007) on DeepSpeed's MoE; a drop-in for `deepspeed.moe.layer.MoE`.

    The positional arguments and their defaults are DeepSpeed's MoE's. Keyword-only extras:

    - eval_k: experts per token in eval mode (default: k).
    - eval_drop_tokens: drop tokens beyond capacity in eval mode (default: drop_tokens, as DeepSpeed).
    - balance_coef: the coefficient your training code multiplies l_aux by (default 0.01). The
      drop-in `forward` returns l_aux = L_balance + (uncertainty_coef / balance_coef) * L_u, so
      that `balance_coef * l_aux` adds exactly `uncertainty_coef * L_u` to the loss.
    - noise_scale, noise_stats, detach_noise_stats, mix_gate_init_bias, eval_noise,
      uncertainty_coef, uncertainty_tau, uncertainty_tokens, uncertainty_on: see S2MoEConfig.

    After every forward, `last_metrics` holds detached tensors for logging: balance_loss,
    uncertainty_loss, mix_gate_mean, mix_gate_std, mix_gate (the per-token g values, for
    histograms), dropped_fraction (share of routes dropped by capacity).
    """

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
                 balance_coef: float = MoEConfig.balance_coef,
                 noise_scale: float = _S2.noise_scale,
                 noise_stats: str = _S2.noise_stats,
                 detach_noise_stats: bool = _S2.detach_noise_stats,
                 mix_gate_init_bias: float = _S2.mix_gate_init_bias,
                 eval_noise: str = _S2.eval_noise,
                 uncertainty_coef: float = _S2.uncertainty_coef,
                 uncertainty_tau: float = _S2.uncertainty_tau,
                 uncertainty_tokens: int = _S2.uncertainty_tokens,
                 uncertainty_on: str = _S2.uncertainty_on) -> None:
        # Validate everything before DeepSpeed's constructor, whose asserts name no field.
        if not (isinstance(hidden_size, int) and hidden_size >= 1):
            raise ConfigError(f"hidden_size: must be an integer >= 1, got {hidden_size!r}")
        if not isinstance(expert, nn.Module):
            raise ConfigError(f"expert: must be a torch.nn.Module, got {type(expert).__name__}")
        # MoEConfig holds the routing checks (divisibility, k range, capacities); reuse them.
        MoEConfig(router="smoe", num_experts=num_experts, ep_size=ep_size, k=k, eval_k=eval_k,
                  capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                  min_capacity=min_capacity, drop_tokens=drop_tokens, use_rts=use_rts,
                  noisy_gate_policy=noisy_gate_policy, top2_2nd_expert_sampling=top2_2nd_expert_sampling,
                  balance_coef=balance_coef, eval_drop_tokens=drop_tokens if eval_drop_tokens is None else eval_drop_tokens)
        self.s2moe_config = S2MoEConfig(noise_scale=noise_scale,
                                        noise_stats=noise_stats,
                                        detach_noise_stats=detach_noise_stats,
                                        mix_gate_init_bias=mix_gate_init_bias,
                                        eval_noise=eval_noise,
                                        uncertainty_coef=uncertainty_coef,
                                        uncertainty_tau=uncertainty_tau,
                                        uncertainty_tokens=uncertainty_tokens,
                                        uncertainty_on=uncertainty_on)
        if uncertainty_coef > 0 and not balance_coef > 0:
            raise ConfigError("balance_coef: must be > 0 when uncertainty_coef > 0, because forward() "
                              "folds uncertainty_coef / balance_coef * L_u into l_aux; use "
                              "forward_parts() to weight the losses yourself")
        super().__init__(hidden_size, expert, num_experts, ep_size, k, capacity_factor, eval_capacity_factor,
                         min_capacity, use_residual, noisy_gate_policy, drop_tokens, use_rts, use_tutel,
                         enable_expert_tensor_parallelism, top2_2nd_expert_sampling)
        self.k = k
        self.eval_k = k if eval_k is None else eval_k
        self.balance_coef = balance_coef
        install_eval_deterministic_gate(self, self.eval_k, eval_drop_tokens)
        cfg = self.s2moe_config
        self.noise = GaussianNoise(cfg.noise_scale, cfg.noise_stats, cfg.detach_noise_stats)
        # Named without "expert": DeepSpeed moves every state-dict key containing that word into
        # the per-expert checkpoint files.
        self.mix_gate = nn.Linear(hidden_size, 1)
        self.reset_mix_gate()
        self.last_metrics: Dict[str, torch.Tensor] = {}
        self.fused = True
        """The fused noisy concat, gate logit, path mix and InfoNCE (same math, fewer buffers);
        False runs the plain reference graph, for tests and before/after benchmarks."""

    def reset_mix_gate(self) -> None:
        """w = 0 and b = mix_gate_init_bias, so g(x) starts at sigmoid(b) for every token."""
        nn.init.zeros_(self.mix_gate.weight)
        nn.init.constant_(self.mix_gate.bias, self.s2moe_config.mix_gate_init_bias)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        if self.s2moe_config.noise_stats == "global":
            # Statistics are shared by the ranks that share the non-expert weights, as SyncBatchNorm
            # shares them across its data-parallel group.
            self.noise.stats_group = groups._get_data_parallel_group()

    def _uses_noise(self) -> bool:
        return self.training or self.s2moe_config.eval_noise != "none"

    def forward_parts(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None) -> S2MoEOutput:
        """The layer's forward with each loss returned on its own.

        hidden_states: [..., hidden_size]; used_token: optional [...] mask, 1 for real tokens and 0
        for padding (padding is left out of the noise statistics and of L_u; top-1 routing also
        leaves it out, as in DeepSpeed).
        """
        cfg = self.s2moe_config
        d_model = hidden_states.shape[-1]
        x_TD = hidden_states.reshape(-1, d_model)
        # fp32, never the activations' dtype: DeepSpeed's top-1 gate counts capacity slots in the
        # mask's dtype, and bf16 holds whole numbers exactly only up to 256.
        mask_T = None if used_token is None else used_token.reshape(-1).to(torch.float32)
        zero = x_TD.new_zeros((), dtype=torch.float32)
        metrics: Dict[str, torch.Tensor] = {}

        if not self._uses_noise():
            # x_hat = x, so g * SMoE(x) + (1 - g) * SMoE(x) = SMoE(x): one dispatch, no gate.
            out_TD = self.deepspeed_moe(x_TD, mask_T)
            uncertainty = zero
        else:
            # Clean tokens first: DeepSpeed drops routes by position when an expert is full, so
            # the clean path (the one evaluation uses) keeps priority over the noisy copy.
            both_2TD, x_hat_TD = self.noise.noisy_concat(x_TD, mask_T, fused=self.fused,
                                                         sample=self.training or cfg.eval_noise == "sample")
            both_mask = None if mask_T is None else torch.cat([mask_T, mask_T], dim=0)
            y_2TD = self.deepspeed_moe(both_2TD, both_mask)
            y_TD, y_hat_TD = y_2TD.chunk(2, dim=0)
            g_T1 = torch.sigmoid(mix_gate_logit(x_TD, self.mix_gate.weight, self.mix_gate.bias, fused=self.fused))
            out_TD = mix_paths(g_T1, y_2TD, fused=self.fused)
            uncertainty = zero
            if self.training and cfg.uncertainty_coef > 0:
                pair = (x_TD, x_hat_TD) if cfg.uncertainty_on == "input" else (y_TD, y_hat_TD)
                uncertainty = sampled_info_nce(*pair, cfg.uncertainty_tau, cfg.uncertainty_tokens, mask_T,
                                               fused=self.fused)
            g_detached = g_T1.detach().reshape(-1)
            metrics["mix_gate"] = g_detached
            metrics["mix_gate_mean"] = g_detached.mean()
            metrics["mix_gate_std"] = g_detached.std(correction=0)

        out = out_TD.reshape(hidden_states.shape)
        if self.use_residual:
            out = self._residual_mix(out, hidden_states)
        balance = self.deepspeed_moe.l_aux
        metrics["balance_loss"] = balance.detach().float()
        metrics["uncertainty_loss"] = uncertainty.detach()
        metrics["dropped_fraction"] = self.deepspeed_moe.gate.last_dropped_fraction
        self.last_metrics = metrics
        return S2MoEOutput(out, balance, uncertainty, self.deepspeed_moe.exp_counts, metrics)

    def _residual_mix(self, out: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Residual MoE (use_residual=True), as DeepSpeed's MoE applies it to its output."""
        output_mlp = self.mlp(hidden_states)
        if isinstance(output_mlp, tuple):
            output_mlp = output_mlp[0]
        coef = F.softmax(self.coefficient(hidden_states), dim=-1)
        return out * coef[..., 0:1] + output_mlp * coef[..., 1:]

    def forward(self,
                hidden_states: torch.Tensor,
                used_token: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DeepSpeed MoE's interface: (output, l_aux, exp_counts).

        l_aux = L_balance + (uncertainty_coef / balance_coef) * L_u, so code written for DeepSpeed's
        MoE (`loss = task_loss + balance_coef * l_aux`) trains S2MoE with both losses weighted as
        configured.
        """
        parts = self.forward_parts(hidden_states, used_token)
        l_aux = parts.balance_loss
        if self.s2moe_config.uncertainty_coef > 0 and self.training:
            l_aux = l_aux + (self.s2moe_config.uncertainty_coef / self.balance_coef) * parts.uncertainty_loss
        return parts.output, l_aux, parts.exp_counts

