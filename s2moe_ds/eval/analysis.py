"""What the experts learned: routing, expert similarity, representation collapse, the mixing gate.

ExpertAnalyzer hooks every block of a model that routes over experts (moe/blocks/base.py's
ExpertBlock: S2MoE, DeepSpeed's MoE) and, while the model runs its evaluation forwards, records for
each layer:

- routing over ALL unmasked tokens: each expert's share of top-1 and of top-k routes, the mean
  router probability per expert, the per-token router entropy, and P(expert | input token);
- on a fixed sample of the first `sample_tokens` unmasked tokens (the same tokens every run, so
  the report is deterministic): the router inputs themselves, from which the report computes
  expert output similarity (every expert applied to the same tokens), the effective rank of the
  representations routed to each expert, and the block's own per-token values in [0, 1]
  (`analysis_extras`: S2MoE's mixing gate g(x) = sigmoid(w^T x + b)).

Entropies are normalised by log(num_experts): 1 is uniform, 0 is everything on one expert.
The functions below the class are the metrics themselves, testable on constructed inputs.
"""

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import ExpertBlock, expert_blocks


def normalized_entropy(p_E: torch.Tensor) -> float:
    """Entropy of a distribution over E outcomes (any non-negative weights) / log(E), in [0, 1]."""
    p_E = p_E.double().clamp_min(0)
    E = p_E.numel()
    if E < 2 or p_E.sum() <= 0:
        return 0.0
    p_E = p_E / p_E.sum()
    h = -(p_E * torch.log(p_E.clamp_min(1e-300))).sum()
    return float(h / math.log(E))


def effective_rank(x_ND: torch.Tensor, center: bool = True) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values.

    Between 1 (every row on one line: full collapse) and min(N, D) (all directions used equally);
    0 when the rows do not vary at all. Rows are centred first by default, so that an offset shared
    by every token does not count as a direction.
    """
    x_ND = x_ND.double()
    if x_ND.shape[0] < 2:
        return float(x_ND.shape[0])
    if center:
        x_ND = x_ND - x_ND.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x_ND)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def cosine_matrix(v_EF: torch.Tensor) -> torch.Tensor:
    """[E, E] cosine similarities between the rows of v_EF."""
    v_EF = F.normalize(v_EF.double(), dim=-1)
    return v_EF @ v_EF.T


def expert_output_similarity(experts: List[nn.Module], x_ND: torch.Tensor) -> torch.Tensor:
    """[E, E]: mean over the N tokens of the cosine between expert i's and expert j's outputs for
    the SAME token. 1 means the experts compute the same function on these tokens."""
    with torch.no_grad():
        y_END = torch.stack([e(x_ND).double().cpu() for e in experts])
    y_END = F.normalize(y_END, dim=-1)
    return torch.einsum("ind,jnd->ij", y_END, y_END) / max(x_ND.shape[0], 1)


def expert_weight_similarity(experts: List[nn.Module]) -> torch.Tensor:
    """[E, E] cosine similarity of the experts' flattened parameters."""
    flat_EP = torch.stack([torch.cat([p.detach().reshape(-1).double() for p in e.parameters()]) for e in experts])
    return cosine_matrix(flat_EP)


def _off_diagonal_mean(m_EE: torch.Tensor) -> float:
    E = m_EE.shape[0]
    if E < 2:
        return float("nan")
    return float((m_EE.sum() - m_EE.diagonal().sum()) / (E * (E - 1)))


class _LayerRecord:

    def __init__(self, num_experts: int, vocab_size: int) -> None:
        self.top1_E = torch.zeros(num_experts, dtype=torch.float64)
        self.topk_E = torch.zeros(num_experts, dtype=torch.float64)
        self.prob_sum_E = torch.zeros(num_experts, dtype=torch.float64)
        self.entropy_sum = 0.0
        self.tokens = 0
        self.token_expert_VE = torch.zeros(vocab_size, num_experts, dtype=torch.float64)
        self.sample: List[torch.Tensor] = []
        self.sample_ids: List[torch.Tensor] = []  # routers such as StableMoE's route by token id
        self.sampled = 0


class ExpertAnalyzer:
    """Collects routing statistics while the model evaluates; `report()` turns them into metrics.

        analyzer = ExpertAnalyzer(model, sample_tokens=4096)
        with analyzer:
            for x, y, mask in batches:
                analyzer.set_tokens(x, mask)
                model(x, y, mask)
        report = analyzer.report()

    Works on a single process holding every expert (a consolidated checkpoint, ep_size 1).
    """

    def __init__(self, model: nn.Module, sample_tokens: int = 4096, vocab_size: Optional[int] = None) -> None:
        self.model = model
        self.layers: List[ExpertBlock] = expert_blocks(model)
        if not self.layers:
            raise ValueError("the model has no MoE layers to analyse (block 'dense')")
        for layer in self.layers:
            local = len(layer.local_experts())
            if local != layer.num_experts:
                raise ValueError(f"analysis needs every expert on this process (ep_size 1), found {local} of "
                                 f"{layer.num_experts}; load a consolidated checkpoint (checkpoint.load_model)")
        self.sample_tokens = sample_tokens
        self.vocab_size = vocab_size or model.cfg.vocab_size
        self.records = [_LayerRecord(layer.num_experts, self.vocab_size) for layer in self.layers]
        self._tokens_T: Optional[torch.Tensor] = None
        self._mask_T: Optional[torch.Tensor] = None
        self._handles = []

    def set_tokens(self, idx_BT: torch.Tensor, mask_BT: Optional[torch.Tensor] = None) -> None:
        """The input ids (and padding mask) of the forward about to run."""
        self._tokens_T = idx_BT.reshape(-1).cpu()
        self._mask_T = None if mask_BT is None else mask_BT.reshape(-1).cpu().bool()

    def __enter__(self) -> "ExpertAnalyzer":
        for layer, record in zip(self.layers, self.records):
            # On the dispatch: models call forward_parts, which skips the block's own hooks, and
            # in eval every block hands the dispatch exactly the clean tokens.
            self._handles.append(layer.register_dispatch_pre_hook(self._hook(layer, record)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer: ExpertBlock, record: _LayerRecord):

        def hook(module, args):
            x_TD = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
            keep_T = torch.ones(x_TD.shape[0], dtype=torch.bool) if self._mask_T is None else self._mask_T
            if self._tokens_T is None or self._tokens_T.numel() != x_TD.shape[0]:
                raise RuntimeError("ExpertAnalyzer: the layer saw a different token count than set_tokens gave; call "
                                   "set_tokens before each forward, in eval mode with eval_noise 'none'")
            x_TD, ids_T = x_TD[keep_T], self._tokens_T[keep_T]
            with torch.no_grad():
                probs_TE = layer.router.probabilities(x_TD, ids_T).double()  # on the CPU, where x_TD now is
            k = layer.router.eval_k
            top_TK = probs_TE.topk(min(k, probs_TE.shape[-1]), dim=-1).indices
            E = probs_TE.shape[-1]
            record.top1_E += torch.bincount(top_TK[:, 0], minlength=E).double()
            record.topk_E += torch.bincount(top_TK.reshape(-1), minlength=E).double()
            record.prob_sum_E += probs_TE.sum(0)
            record.entropy_sum += float(-(probs_TE * probs_TE.clamp_min(1e-300).log()).sum())
            record.tokens += x_TD.shape[0]
            record.token_expert_VE.index_put_((ids_T.long(), top_TK[:, 0]), torch.ones(len(ids_T), dtype=torch.float64),
                                              accumulate=True)
            room = self.sample_tokens - record.sampled
            if room > 0:
                record.sample.append(x_TD[:room])
                record.sample_ids.append(ids_T[:room])
                record.sampled += min(room, x_TD.shape[0])

        return hook

    def report(self, top_tokens: int = 32, decode=None) -> Dict[str, object]:
        """Per-layer metrics as plain Python values. Keys starting with "_" hold raw values for
        histograms and plots; `public(report)` leaves them out of the JSON report.

        decode: optional callable id -> str, to label the routing heatmap's tokens.
        """
        layers = []
        for i, (layer, rec) in enumerate(zip(self.layers, self.records)):
            if rec.tokens == 0:
                raise RuntimeError("no tokens were analysed; run the model inside `with analyzer:`")
            E = layer.num_experts
            experts = layer.local_experts()
            device = next(layer.parameters()).device
            x_ND = torch.cat(rec.sample).to(device)
            probs_T = rec.prob_sum_E / rec.tokens
            top1_share = rec.top1_E / rec.top1_E.sum()
            topk_share = rec.topk_E / rec.topk_E.sum()
            with torch.no_grad():
                top1_N = layer.router.probabilities(x_ND, torch.cat(rec.sample_ids)).argmax(-1)
            out_sim = expert_output_similarity(experts, x_ND)
            w_sim = expert_weight_similarity(experts)
            per_expert_rank = []
            for e in range(E):
                rows = x_ND[top1_N == e].cpu()
                per_expert_rank.append({"tokens": int(rows.shape[0]),
                                        "effective_rank": effective_rank(rows) if rows.shape[0] >= 2 else None})
            ranked = [r for r in per_expert_rank if r["effective_rank"] is not None]
            weights = sum(r["tokens"] for r in ranked)
            token_counts_V = rec.token_expert_VE.sum(1)
            frequent = token_counts_V.argsort(descending=True)[:top_tokens]
            frequent = frequent[token_counts_V[frequent] > 0]
            heat_KE = rec.token_expert_VE[frequent] / token_counts_V[frequent].unsqueeze(1)
            entry = {
                "layer": i,
                "block": layer.kind,
                "router": layer.router.kind,
                "num_experts": E,
                "tokens": rec.tokens,
                "k": int(layer.router.eval_k),
                "top1_share": top1_share.tolist(),
                "topk_share": topk_share.tolist(),
                "router_prob_mean": probs_T.tolist(),
                "utilisation_entropy": normalized_entropy(top1_share),
                "utilisation_entropy_topk": normalized_entropy(topk_share),
                "router_entropy_mean": rec.entropy_sum / rec.tokens / math.log(E),
                "sample_tokens": int(x_ND.shape[0]),
                "output_similarity": out_sim.tolist(),
                "output_similarity_mean": _off_diagonal_mean(out_sim),
                "weight_similarity": w_sim.tolist(),
                "weight_similarity_mean": _off_diagonal_mean(w_sim),
                "effective_rank_all": effective_rank(x_ND.cpu()),
                "effective_rank_per_expert": per_expert_rank,
                "effective_rank_expert_mean": (sum(r["effective_rank"] * r["tokens"] for r in ranked) / weights
                                               if weights else None),
                "d_model": int(x_ND.shape[1]),
                "routing_heatmap": {"tokens": [decode(int(t)) if decode else int(t) for t in frequent],
                                    "p_expert_given_token": heat_KE.tolist()},
            }
            with torch.no_grad():
                extras = layer.analysis_extras(x_ND)
            for name, values_N in extras.items():
                entry[name] = _unit_interval_summary(values_N.double().cpu())
            layers.append(entry)
        return {"layers": layers}


def _unit_interval_summary(values_N: torch.Tensor) -> Dict[str, object]:
    """Mean, std, quantiles and a 20-bin histogram over [0, 1] of per-token values (a gate's)."""
    q = torch.quantile(values_N, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    return {"mean": float(values_N.mean()), "std": float(values_N.std(correction=0)),
            "quantiles": dict(zip(("p05", "p25", "p50", "p75", "p95"), q.tolist())),
            "histogram_0_1_20_bins": torch.histc(values_N, bins=20, min=0.0, max=1.0).tolist(),
            "_values": values_N.tolist()}


def public(report):
    """The report without its raw "_" entries (what the JSON file holds)."""
    if isinstance(report, dict):
        return {k: public(v) for k, v in report.items() if not k.startswith("_")}
    if isinstance(report, list):
        return [public(v) for v in report]
    return report
