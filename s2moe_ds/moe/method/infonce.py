"""The uncertainty loss: InfoNCE between each token and its own noisy copy.

    L_u = mean_i CE(softmax_j(sim(a_i, b_j) / tau), target = i)

b_i is a_i's positive and the other rows of b are its negatives. sim is the cosine (the default),
the dot product, or the negative squared distance -||a_i - b_j||^2 (S2MoEConfig.uncertainty_similarity). The loss is computed on a sample
of at most `max_tokens` rows, so its memory is max_tokens^2, never T^2 for the full token count.
`gathered_info_nce` is the other choice (S2MoEConfig.uncertainty_negatives 'global'): every token
against the copies of every token of the data-parallel group, in chunks of anchors.
Shapes: N sampled rows, D features, T tokens, G gathered rows.
"""

from typing import Callable, Optional

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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


def _chunk_loss(anchor_CD: torch.Tensor, keys_GD: torch.Tensor, valid_G: Optional[torch.Tensor], first: int,
                tau: float, kind: str) -> torch.Tensor:
    logits_CG = similarity(anchor_CD, keys_GD, kind) / tau
    if valid_G is not None:
        logits_CG = logits_CG.masked_fill(~valid_G, float("-inf"))
    target_C = torch.arange(first, first + anchor_CD.shape[0], device=anchor_CD.device)
    return F.cross_entropy(logits_CG, target_C, reduction="sum")


def gathered_info_nce(anchor_TD: torch.Tensor, positive_TD: torch.Tensor, tau: float, chunk: int,
                      mask_T: Optional[torch.Tensor] = None, kind: str = "cosine", group=None) -> torch.Tensor:
    """InfoNCE of every unmasked local token against the positives of every unmasked token of the
    ranks of `group` (all gathered, differentiably: each rank's loss reaches the others' copies in
    backward), averaged over the local tokens. Anchors go `chunk` at a time, each chunk recomputed
    in backward, so the memory is chunk x G, not G^2. group None is the default group when a process
    group is initialized; without one, the loss is over this process's tokens. A collective: every
    rank of the group calls it, even with no token."""
    if mask_T is not None:
        keep_T = mask_T.reshape(-1) > 0
        anchor_TD, positive_TD = anchor_TD[keep_T], positive_TD[keep_T]
    dtype = torch.promote_types(anchor_TD.dtype, torch.float32)
    a_ND, p_ND = anchor_TD.to(dtype), positive_TD.to(dtype)
    n = a_ND.shape[0]
    keys_GD, valid_G, first = p_ND, None, 0
    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size(group) > 1:
        from torch.distributed.nn.functional import all_gather
        counts = [torch.zeros(1, dtype=torch.long, device=a_ND.device) for _ in range(torch_dist.get_world_size(group))]
        torch_dist.all_gather(counts, torch.tensor([n], device=a_ND.device), group=group)
        counts = [int(c.item()) for c in counts]
        most = max(counts)
        # Ranks may hold different token counts (padding masks): pad to the largest, mask the padding.
        keys_GD = torch.cat(all_gather(F.pad(p_ND, (0, 0, 0, most - n)), group=group))
        valid_G = torch.cat([torch.arange(most, device=a_ND.device) < c for c in counts])
        first = torch_dist.get_rank(group) * most
    if n == 0 or (valid_G is not None and int(valid_G.sum()) < 2) or keys_GD.shape[0] < 2:
        return a_ND.sum() * 0.0 + keys_GD.sum() * 0.0  # no negatives: log(1) = 0, still in the graph
    total = a_ND.new_zeros(())
    for start in range(0, n, chunk):
        total = total + checkpoint(_chunk_loss, a_ND[start:start + chunk], keys_GD, valid_G, first + start, tau, kind,
                                   use_reentrant=False)
    return total / n
