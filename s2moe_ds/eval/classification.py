"""Full passes over a classification split: accuracy, macro-F1 and mean cross-entropy, summed
over ranks, so the numbers do not depend on how many processes run them."""

from typing import Callable, Dict, Optional

import deepspeed.comm as dist
import torch
import torch.nn.functional as F

from ..data.classification import Examples, eval_indices


def scores_from_confusion(confusion_CC: torch.Tensor) -> Dict[str, float]:
    """accuracy and macro-F1 (over the classes that occur as a label or a prediction) of a
    confusion matrix [true, predicted]."""
    c = confusion_CC.double()
    tp_C = c.diag()
    support_C, predicted_C = c.sum(1), c.sum(0)
    seen_C = (support_C + predicted_C) > 0
    f1_C = 2 * tp_C / (support_C + predicted_C).clamp_min(1.0)
    total = c.sum().item()
    return {"accuracy": tp_C.sum().item() / max(total, 1.0),
            "macro_f1": f1_C[seen_C].mean().item() if seen_C.any() else 0.0}


def _longest_over_ranks(longest: int, device) -> int:
    """One padded length for every rank's batch: an expert-parallel forward's all-to-all needs the
    same token count on each rank whenever capacities come from it (eval_drop_tokens)."""
    if not dist.is_initialized():
        return longest
    t = torch.tensor([longest], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def evaluate_classifier(forward: Callable, examples: Examples, num_labels: int, batch_size: int, rank: int,
                        world_size: int, device, max_batches: Optional[int] = None) -> Dict[str, float]:
    """forward(x_BT, labels_B, mask_BT) -> LMOutput with logits [B, C]. Every rank runs the same
    number of forwards (an expert-parallel forward is a collective), padding with fully masked
    batches whose examples are not counted."""
    batches = eval_indices(len(examples), batch_size, rank, world_size)
    if max_batches is not None:
        batches = batches[:max_batches]
    n = torch.tensor([len(batches)], dtype=torch.long, device=device)
    if dist.is_initialized():
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    confusion_CC = torch.zeros(num_labels, num_labels, dtype=torch.float64, device=device)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in range(int(n.item())):
            real = i < len(batches)
            rows = batches[i] if real else [0]
            x_BT, y_B, mask_BT = examples.batch(rows, length=_longest_over_ranks(examples.longest(rows), device))
            if not real:
                mask_BT = torch.zeros_like(mask_BT)
            x_BT, y_B, mask_BT = x_BT.to(device), y_B.to(device), mask_BT.to(device)
            logits_BC = forward(x_BT, y_B, mask_BT).logits.float()
            if real:
                pred_B = logits_BC.argmax(-1)
                confusion_CC.index_put_((y_B, pred_B), torch.ones_like(y_B, dtype=torch.float64), accumulate=True)
                nll += F.cross_entropy(logits_BC, y_B, reduction="sum").double()
    totals = torch.cat([confusion_CC.flatten(), nll.reshape(1)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    confusion_CC = totals[:-1].reshape(num_labels, num_labels).cpu()
    count = confusion_CC.sum().item()
    return {**scores_from_confusion(confusion_CC), "loss": totals[-1].item() / max(count, 1.0), "examples": count,
            "confusion": confusion_CC.long().tolist()}
