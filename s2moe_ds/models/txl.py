"""'txl': Transformer-XL (Dai et al. 2019), the S2MoE paper's backbone, with any feed-forward block kind.

Each layer attends over its own input of the current segment and a memory of the last mem_len
inputs it saw before (stop-gradient), with relative positions: the score of query i and key j is

    (q_i + u) . k_j + (q_i + v) . W_r R[dist(i, j)]              (u, v: the two global biases)

where R is the sinusoidal encoding of the distance dist = pos(i) - pos(j) >= 0, clamped to
clamp_len. Tokens are embedded scaled by sqrt(d_model) and predicted through the tied embedding
(plus an output bias).
Layers are post-norm by default, as in the original (pre_norm switches). In eval mode the model
uses eval_mem_len and eval_clamp_len, so the evaluation protocol is set apart from training's.

The feed-forward block of each layer comes from moe/registry.py and sees only the current segment:
S2MoE's noise statistics are over the segment's tokens, never over the memory.

Memory is the model's `state`: a tuple with one [B, M, D] tensor per layer (the input of that layer
over the last M <= mem_len positions), returned in LMOutput.state and passed back by the caller
with the next segment of the same streams (None at a stream's start).

Shapes: B sequences, T tokens of the segment, M memory positions, K = M + T keys, D = d_model,
H heads of d = d_head (D / H unless set), I = H * d, V vocabulary.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_bool, check_int, check_optional_int, require
from ..moe import FFN, build_block
from ..moe.spec import ModelContext
from .base import LayerOutputs, LMOutput, init_weights, next_token_loss, sample_next


@dataclass
class TransformerXLConfig:
    """Transformer-XL's own settings (model.backbone_config with model.backbone 'txl')."""

    d_head: Optional[int] = None
    """Size of each attention head; None means d_model / n_head. The paper's setup uses 64 with
    d_model 256 and 8 heads, so heads are not a split of d_model."""
    mem_len: int = 64
    """Memory positions per layer carried from one training segment to the next (0: none)."""
    clamp_len: Optional[int] = None
    """Relative distances above this use its encoding (None: no clamp)."""
    eval_mem_len: Optional[int] = None
    """Memory in evaluation; None means mem_len."""
    eval_clamp_len: Optional[int] = None
    """clamp_len in evaluation; None means clamp_len."""
    eval_tgt_len: Optional[int] = None
    """Segment length in evaluation; None means the training seq_len."""
    eval_streams: int = 8
    """Evaluation reads each split as this many contiguous streams, in order, with memory: a fixed
    layout, so that the BPC does not depend on how many processes evaluate."""
    pre_norm: bool = False
    """Layer norm before attention and the feed-forward block (False: after, as the original)."""
    untie_r: bool = False
    """Each layer learns its own two biases u, v (False: one pair shared by all layers)."""

    def __post_init__(self) -> None:
        p = "model.backbone_config."
        check_optional_int(self.d_head, p + "d_head", 1)
        check_int(self.mem_len, p + "mem_len", 0)
        check_optional_int(self.clamp_len, p + "clamp_len", 0)
        check_optional_int(self.eval_mem_len, p + "eval_mem_len", 0)
        check_optional_int(self.eval_clamp_len, p + "eval_clamp_len", 0)
        check_optional_int(self.eval_tgt_len, p + "eval_tgt_len", 1)
        check_int(self.eval_streams, p + "eval_streams", 1)
        check_bool(self.pre_norm, p + "pre_norm")
        check_bool(self.untie_r, p + "untie_r")

    def memory(self, training: bool) -> int:
        return self.mem_len if training or self.eval_mem_len is None else self.eval_mem_len

    def clamp(self, training: bool) -> Optional[int]:
        return self.clamp_len if training or self.eval_clamp_len is None else self.eval_clamp_len


def check(cfg) -> None:
    """The settings against the rest of the model config (ModelConfig calls it)."""
    s = cfg.backbone_config
    if s.eval_tgt_len is not None:
        require(s.eval_tgt_len <= cfg.max_seq_len, "model.backbone_config.eval_tgt_len",
                f"{s.eval_tgt_len} exceeds model.max_seq_len {cfg.max_seq_len}; lower it or raise --max-seq-len")


def head_size(cfg) -> int:
    return cfg.backbone_config.d_head or cfg.d_model // cfg.n_head


def has_memory(cfg) -> bool:
    s = cfg.backbone_config
    return s.mem_len > 0 or bool(s.eval_mem_len)


def attention_flops(cfg, seq_len: int, training: bool) -> float:
    """Per token and layer, for segments of T tokens over M memory positions (K = M + T keys):
    queries and output on the segment, keys and values recomputed over all K, the distance
    projection of K encodings (per sequence), content scores and the weighted sum over the mean
    causal context M + (T + 1) / 2, and the distance scores over all K."""
    d, inner = cfg.d_model, cfg.n_head * head_size(cfg)
    T = min(seq_len, cfg.max_seq_len)
    M = cfg.backbone_config.memory(training)
    K = M + T
    return 4 * d * inner + 6 * d * inner * K / T + 4 * (M + (T + 1) / 2) * inner + 2 * K * inner


def sinusoid_KD(distances_K: torch.Tensor, d_model: int) -> torch.Tensor:
    """[K, D]: sin of distance * frequency in the first half, cos in the second (Vaswani et al.)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d_model, 2, dtype=torch.float32, device=distances_K.device) / d_model))
    angle_KF = distances_K.float()[:, None] * inv_freq[None, :]
    return torch.cat([angle_KF.sin(), angle_KF.cos()], dim=-1)


class RelativeAttention(nn.Module):
    """Multi-head attention of the segment over [memory; segment] with relative positions."""

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.d_head = n_head, d_head
        self.qkv = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.r_proj = nn.Linear(d_model, n_head * d_head, bias=False)
        self.proj = nn.Linear(n_head * d_head, d_model, bias=False)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, h_BTD: torch.Tensor, mem_BMD: Optional[torch.Tensor], r_KD: torch.Tensor,
                u_Hd: torch.Tensor, v_Hd: torch.Tensor) -> torch.Tensor:
        """h: the segment; mem: this layer's memory (None: none); r_KD: row p encodes distance p."""
        B, T, D = h_BTD.shape
        H, d = self.n_head, self.d_head
        cat_BKD = h_BTD if mem_BMD is None else torch.cat([mem_BMD, h_BTD], dim=1)
        K = cat_BKD.shape[1]
        M = K - T
        # Queries only for the segment's own positions; keys and values over memory and segment.
        q_BTI = F.linear(h_BTD, self.qkv.weight[:H * d])
        kv_BKI = F.linear(cat_BKD, self.qkv.weight[H * d:])
        q_BHTd = q_BTI.view(B, T, H, d).transpose(1, 2)
        k_BHKd, v_BHKd = (t.reshape(B, K, H, d).transpose(1, 2) for t in kv_BKI.split(H * d, dim=-1))
        rk_HKd = self.r_proj(r_KD).view(K, H, d).transpose(0, 1)
        content_BHTK = torch.einsum("bhtd,bhkd->bhtk", q_BHTd + u_Hd[None, :, None, :], k_BHKd)
        by_distance_BHTK = torch.einsum("bhtd,hkd->bhtk", q_BHTd + v_Hd[None, :, None, :], rk_HKd)
        # Query i sits at position M + i, key j at j: their distance indexes the second term.
        dist_TK = (M + torch.arange(T, device=h_BTD.device))[:, None] - torch.arange(K, device=h_BTD.device)[None, :]
        causal_TK = dist_TK >= 0
        position_BHTK = torch.gather(by_distance_BHTK, 3,
                                     dist_TK.clamp(min=0).expand(B, H, T, K))
        score_BHTK = (content_BHTK + position_BHTK) / math.sqrt(d)
        score_BHTK = score_BHTK.float().masked_fill(~causal_TK, float("-inf"))
        attn_BHTK = self.attn_drop(F.softmax(score_BHTK, dim=-1).to(v_BHKd.dtype))
        y_BHTd = attn_BHTK @ v_BHKd
        return self.proj(y_BHTd.transpose(1, 2).reshape(B, T, H * d))


class Layer(nn.Module):

    def __init__(self, cfg, settings: TransformerXLConfig, kind: str, ep_size: int) -> None:
        super().__init__()
        self.pre_norm = settings.pre_norm
        self.attn = RelativeAttention(cfg.d_model, cfg.n_head, head_size(cfg), cfg.dropout)
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = build_block(cfg.moe, kind, cfg.d_model, FFN(cfg.d_model, cfg.d_inner, cfg.dropout, cfg.activation), ep_size,
                               ModelContext(vocab_size=cfg.vocab_size))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h_BTD, mem_BMD, r_KD, u_Hd, v_Hd, mask_BT, idx_BT):
        """(the layer's output, the feed-forward block's BlockOutput)."""
        if self.pre_norm:
            # The memory holds the layer's raw inputs; the norm is applied to keys and queries alike.
            mem = None if mem_BMD is None else self.ln1(mem_BMD)
            x_BTD = h_BTD + self.drop(self.attn(self.ln1(h_BTD), mem, r_KD, u_Hd, v_Hd))
            parts = self.ffn.forward_parts(self.ln2(x_BTD), mask_BT, idx_BT)
            return x_BTD + self.drop(parts.output), parts
        x_BTD = self.ln1(h_BTD + self.drop(self.attn(h_BTD, mem_BMD, r_KD, u_Hd, v_Hd)))
        parts = self.ffn.forward_parts(x_BTD, mask_BT, idx_BT)
        return self.ln2(x_BTD + self.drop(parts.output)), parts


class TransformerXL(nn.Module):

    def __init__(self, cfg, parallel=None) -> None:
        super().__init__()
        ep_size = 1 if parallel is None else parallel.ep_size
        self.cfg = cfg
        self.settings: TransformerXLConfig = cfg.backbone_config
        s, H, d = self.settings, cfg.n_head, head_size(cfg)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Layer(cfg, s, cfg.block_kind(i), ep_size) for i in range(cfg.n_layer))
        biases = cfg.n_layer if s.untie_r else 1
        self.u_LHd = nn.Parameter(torch.zeros(biases, H, d))
        self.v_LHd = nn.Parameter(torch.zeros(biases, H, d))
        self.ln_f = nn.LayerNorm(cfg.d_model) if s.pre_norm else nn.Identity()
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # the original's output layer has one
        self.apply(init_weights)
        nn.init.normal_(self.u_LHd, std=0.02)
        nn.init.normal_(self.v_LHd, std=0.02)
        for layer in self.layers:
            layer.ffn.reset_block_parameters()

    def features(self, idx_BT: torch.Tensor, mask_BT: Optional[torch.Tensor] = None,
                 state: Optional[Tuple[torch.Tensor, ...]] = None):
        """(the last layer's hidden states [B, T, D] after the final norm, the blocks'
        LayerOutputs, the new memory or None): what the LM head and a classification head read.
        idx: [B, T]; mask: [B, T], 0 on padding; state: the memory the previous segment of the
        same streams returned (None: no memory)."""
        B, T = idx_BT.shape
        cfg, s = self.cfg, self.settings
        if T > cfg.max_seq_len:
            raise ValueError(f"segment length {T} exceeds model.max_seq_len {cfg.max_seq_len}")
        if state is not None and (len(state) != cfg.n_layer or state[0].shape[0] != B):
            raise ValueError(f"state: expected {cfg.n_layer} memories of batch {B}, got {len(state)} of "
                             f"batch {state[0].shape[0]}; pass the state of the same streams (or None)")
        mem_len = s.memory(self.training)
        mems = [None] * cfg.n_layer if state is None or mem_len == 0 else [m[:, -mem_len:] for m in state]
        M = 0 if mems[0] is None else mems[0].shape[1]
        distances_K = torch.arange(M + T, device=idx_BT.device)
        clamp = s.clamp(self.training)
        if clamp is not None:
            distances_K = distances_K.clamp(max=clamp)
        h_BTD = self.drop(self.tok_emb(idx_BT) * math.sqrt(cfg.d_model))
        r_KD = self.drop(sinusoid_KD(distances_K, cfg.d_model).to(h_BTD.dtype))
        collected, new_mems = LayerOutputs(), []
        for i, layer in enumerate(self.layers):
            if mem_len:
                # What the next segment remembers: this layer's input, never differentiated through.
                both = h_BTD if mems[i] is None else torch.cat([mems[i], h_BTD], dim=1)
                new_mems.append(both[:, -mem_len:].detach())
            b = i if s.untie_r else 0
            h_BTD, parts = layer(h_BTD, mems[i], r_KD, self.u_LHd[b], self.v_LHd[b], mask_BT, idx_BT)
            collected.add(parts)
        return self.ln_f(h_BTD), collected, tuple(new_mems) if mem_len else None

    def forward(self, idx_BT: torch.Tensor, targets_BT: Optional[torch.Tensor] = None,
                mask_BT: Optional[torch.Tensor] = None, state: Optional[Tuple[torch.Tensor, ...]] = None) -> LMOutput:
        """idx/targets: [B, T]; mask: [B, T], 0 on padding; state: as in `features`. Returns the
        new memory in LMOutput.state."""
        h_BTD, collected, new_state = self.features(idx_BT, mask_BT, state)
        logits_BTV = F.linear(self.drop(h_BTD), self.tok_emb.weight, self.out_bias)
        return collected.output(logits_BTV, next_token_loss(logits_BTV, targets_BT, mask_BT), new_state)

    @torch.no_grad()
    def generate(self, idx_BT: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample continuations in eval mode: the prompt is read in segments of max_seq_len into the
        memory, then each new token is one segment attending over eval_mem_len earlier positions."""
        state = None
        for segment_BT in idx_BT.split(self.cfg.max_seq_len, dim=1):
            out = self(segment_BT, state=state)
            state = out.state
        for _ in range(max_new_tokens):
            next_B1 = sample_next(out.logits[:, -1, :], temperature, top_k, generator)
            idx_BT = torch.cat([idx_BT, next_B1], dim=1)
            out = self(next_B1, state=state)
            state = out.state
        return idx_BT
