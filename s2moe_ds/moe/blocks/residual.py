"""DeepSpeed's residual MoE (PR-MoE, arXiv 2201.05596) for the drop-in S2MoE: `use_residual=True`.

DeepSpeed's MoE with use_residual=True keeps the module it was given as `expert` as a dense MLP
(`mlp`: that very module, so it starts equal to every expert, which are deep copies of it, and two
layers given one expert module share it) and adds `coefficient = nn.Linear(hidden_size, 2)`:

    c = softmax(coefficient(x))            per token, in the activations' dtype
    out = c[0] * MoE(x) + c[1] * mlp(x)    (an mlp returning a tuple counts by its first item)

DeepSpeed's constructor, which S2MoE calls, makes both parameters, with DeepSpeed's names and
shapes, so state dicts and checkpoints carry over both ways (neither name holds "expert", so both
live in the model-states file, outside the per-expert files, as in DeepSpeed).

S2MoE applies the residual once, to its mixed output, with the clean tokens x only:

    out = c(x)[0] * (g * SMoE(x) + (1 - g) * SMoE(x_hat)) + c(x)[1] * mlp(x)      training
    out = c(x)[0] * SMoE(x) + c(x)[1] * mlp(x)                                    eval

Why this and not a residual inside each path:
- S2MoE's noisy copy is there for the sparse path: it sends a perturbed token through the same
  router and experts (docs/method.md). The dense MLP routes nothing; every token goes through it.
- The mix is linear and c is a function of x, so a residual per path with the MLP on the clean
  tokens gives the same output: g (c0 y + c1 m) + (1 - g) (c0 y_hat + c1 m) = c0 (g y + (1 - g)
  y_hat) + c1 m. Applying it once costs one dense pass per token, as in DeepSpeed, and leaves the
  mixing inside DeepSpeed's combine (the fused path) unchanged.
- In eval (eval_noise 'none') the layer computes DeepSpeed's residual MoE formula on SMoE(x), so
  with the same weights an S2MoE evaluates as DeepSpeed's MoE(use_residual=True) does.
- uncertainty_on 'output' compares SMoE(x) and SMoE(x_hat), the experts' outputs, before the
  residual: the residual is the same c1 m for both copies and would only shift them.
"""

import torch
from torch import nn
from torch.nn import functional as F


def residual_mix(mlp: nn.Module, coefficient: nn.Module, x: torch.Tensor, moe_out: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's residual MoE output: softmax(coefficient(x)) weighs moe_out and mlp(x) per token.
    x and moe_out: [..., hidden_size], the same shape."""
    mlp_out = mlp(x)
    if isinstance(mlp_out, tuple):
        mlp_out = mlp_out[0]  # DeepSpeed ignores an MLP's bias term here too
    coef = F.softmax(coefficient(x), dim=-1)
    return moe_out * coef[..., 0:1] + mlp_out * coef[..., 1:]
