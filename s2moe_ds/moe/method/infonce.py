"""The uncertainty loss: InfoNCE between each token and its own noisy copy.

    L_u = mean_i CE(softmax_j(sim(a_i, b_j) / tau), target = i)

b_i is a_i's positive and the other rows of b are its negatives. sim is the cosine (the default),
the dot product, or the negative squared distance -||a_i - b_j||^2 (S2MoEConfig.uncertainty_similarity). The loss is computed on a sample
of at most `max_tokens` rows, so its memory is max_tokens^2, never T^2 for the full token count.
Shapes: N sampled rows, D features, T tokens.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F


SIMILARITIES = ("cosine", "dot", "neg_sq_distance")


def similarity(a_ND: torch.Tensor, b_MD: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """[N, M] sim(a_n, b_m) of every pair of rows."""
    if kind == "cosine":
        return F.normalize(a_ND, dim=-1) @ F.normalize(b_MD, dim=-1).t()
    if kind == "dot":
        return a_ND @ b_MD.t()
    if kind == "neg_sq_distance":
        # Expanded, not torch.cdist: its gradient is NaN where two rows coincide.
        return 2 * (a_ND @ b_MD.t()) - a_ND.square().sum(-1, keepdim=True) - b_MD.square().sum(-1).unsqueeze(0)
    raise ValueError(f"similarity: must be one of {', '.join(map(repr, SIMILARITIES))}, got {kind!r}")


def info_nce(anchor_ND: torch.Tensor, positive_ND: torch.Tensor, tau: float, kind: str = "cosine") -> torch.Tensor:
    """InfoNCE over N paired rows with similarity `kind`, computed in fp32 or the inputs' wider
    dtype (bf16 logits over hundreds of negatives would round the softmax away)."""
    dtype = torch.promote_types(anchor_ND.dtype, torch.float32)
    a_ND = anchor_ND.to(dtype)
    logits_NN = similarity(a_ND, positive_ND.to(dtype), kind) / tau
    target_N = torch.arange(a_ND.shape[0], device=a_ND.device)
    return F.cross_entropy(logits_NN, target_N)


def sample_rows(num_rows: int, max_rows: int, mask_T: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """Indices of at most max_rows unmasked rows, drawn without replacement.

    Returns None when every row is used as is (no mask, few rows): then no random numbers are
    drawn. The loss is invariant to the order of the rows, so taking all of them needs no shuffle.
    """
    if mask_T is None:
        if num_rows <= max_rows:
            return None
        return torch.randperm(num_rows, device=device)[:max_rows]
    valid_V = torch.nonzero(mask_T.reshape(-1) > 0, as_tuple=False).squeeze(1)
    if valid_V.numel() > max_rows:
        valid_V = valid_V[torch.randperm(valid_V.numel(), device=device)[:max_rows]]
    return valid_V


def sampled_info_nce(anchor_TD: torch.Tensor, positive_TD: torch.Tensor, tau: float, max_tokens: int,
                     mask_T: Optional[torch.Tensor] = None, loss: Callable = info_nce) -> torch.Tensor:
    """InfoNCE on a shared random sample of at most max_tokens unmasked rows of both tensors;
    `loss` computes it on the sample (info_nce here, or fused.info_nce)."""
    idx_N = sample_rows(anchor_TD.shape[0], max_tokens, mask_T, anchor_TD.device)
    if idx_N is not None:
        if idx_N.numel() < 2:
            # One token has no negatives: the loss is log(1) = 0 whatever the inputs.
            return anchor_TD.new_zeros((), dtype=torch.float32)
        anchor_TD, positive_TD = anchor_TD[idx_N], positive_TD[idx_N]
    return loss(anchor_TD, positive_TD, tau)
