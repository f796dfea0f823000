"""Evaluation that streams: batches are built as the forwards read them, --eval-max-batches is
applied before any is built, and the numbers are exactly those of the list-based evaluation it
replaced (kept below as the reference, as it was before the change), on the committed corpus,
for both backbones, also on a rank that pads to the others' number of forwards. Switching a
model's eval_k in place gives what a model built with that eval_k gives."""

import math
import os

import numpy as np
import pytest
import torch

from s2moe_ds.data import DataConfig, eval_batches, prepare_corpus, stream_eval_batches
from s2moe_ds.eval import evaluate_lm, lm_eval
from s2moe_ds.models import build_model
from s2moe_ds.moe import expert_blocks, experts_per_token
from s2moe_ds.train import model_preset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "tests", "data", "golden_corpus.txt")


# ------------------------------------------------------------------ the list-based reference (before the change)

def _list_eval_batches(tokens_N, seq_len, batch_size, rank, world_size):
    n = len(tokens_N)
    num_windows = -(-max(n - 1, 0) // seq_len)
    mine = np.arange(rank, num_windows, world_size)
    if len(mine) == 0:
        zeros_BT = torch.zeros(batch_size, seq_len, dtype=torch.long)
        return [(zeros_BT, zeros_BT.clone(), zeros_BT.clone())]
    out = []
    for b in range(0, len(mine), batch_size):
        starts_B = mine[b:b + batch_size] * seq_len
        starts_B = np.concatenate([starts_B, np.full(batch_size - len(starts_B), n, dtype=starts_B.dtype)])
        index_BT1 = starts_B[:, None] + np.arange(seq_len + 1)[None, :]
        valid_BT1 = index_BT1 < n
        window_BT1 = torch.from_numpy(np.where(valid_BT1, np.asarray(tokens_N[np.minimum(index_BT1, n - 1)],
                                                                     dtype=np.int64), 0))
        out.append((window_BT1[:, :-1], window_BT1[:, 1:], torch.from_numpy(valid_BT1[:, 1:].astype(np.int64))))
    return out


def _list_stream_eval_batches(tokens_N, seq_len, streams, rank, world_size):
    n = len(tokens_N)
    length = max(n - 1, 0) // streams
    rows = -(-streams // world_size)
    mine = np.arange(rank, streams, world_size)
    ends_S = np.minimum(np.arange(1, streams + 1) * length, n - 1)
    ends_S[-1] = n - 1
    longest = int((ends_S - np.arange(streams) * length).max())
    out = []
    for pos in range(0, longest, seq_len):
        x_BT, y_BT, mask_BT = (np.zeros((rows, seq_len), dtype=np.int64) for _ in range(3))
        for row, s in enumerate(mine):
            start, end = s * length + pos, ends_S[s]
            count = max(min(seq_len, end - start), 0)
            if count:
                x_BT[row, :count] = tokens_N[start:start + count]
                y_BT[row, :count] = tokens_N[start + 1:start + count + 1]
                mask_BT[row, :count] = 1
        out.append((torch.from_numpy(x_BT), torch.from_numpy(y_BT), torch.from_numpy(mask_BT)))
    return out


def _list_evaluate_split(forward, batches, unit_count, split_tokens, max_batches, dist):
    batches = list(batches)
    if max_batches is not None:
        batches = batches[:max_batches]
    n = torch.tensor([len(batches)], dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    nll = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for i in range(int(n.item())):
            x, y, mask = batches[i] if i < len(batches) else (*batches[0][:2], torch.zeros_like(batches[0][2]))
            out = forward(x, y, mask)
            count = mask.float().sum()
            nll += out.task_loss.double().cpu() * count.double().cpu()
            tokens += count.double().cpu()
    totals = torch.stack([nll, tokens])
    if dist.is_initialized():
        dist.all_reduce(totals)
    nll_total, token_total = totals.cpu().tolist()
    units = unit_count * token_total / max(split_tokens - 1, 1)
    return {"nll_per_token": nll_total / max(token_total, 1.0), "tokens": token_total,
            "bpc": nll_total / math.log(2) / units}


def _list_evaluate_lm(model_forward, cfg, tokens_N, seq_len, batch_size, rank, world, unit_count, max_batches, dist):
    if not cfg.has_memory:
        return _list_evaluate_split(lambda x, y, m: model_forward(x, y, m, None),
                                    _list_eval_batches(tokens_N, seq_len, batch_size, rank, world), unit_count,
                                    len(tokens_N), max_batches, dist)
    s = cfg.backbone_config
    state = None

    def forward(x, y, m):
        nonlocal state
        out = model_forward(x, y, m, state)
        state = out.state
        return out
    return _list_evaluate_split(forward, _list_stream_eval_batches(tokens_N, s.eval_tgt_len or seq_len,
                                                                   s.eval_streams, rank, world),
                                unit_count, len(tokens_N), max_batches, dist)


# ------------------------------------------------------------------ helpers

class _Touched:
    """A token array that records the highest index read and how many reads there were."""

    def __init__(self, tokens_N):
        self.tokens_N, self.highest, self.reads = tokens_N, -1, 0

    def __len__(self):
        return len(self.tokens_N)

    def __getitem__(self, index):
        self.reads += 1
        if isinstance(index, slice):
            self.highest = max(self.highest, (index.stop or len(self)) - 1)
        else:
            self.highest = max(self.highest, int(np.max(index)))
        return self.tokens_N[index]


class _OtherRankHasMore:
    """deepspeed.comm as seen by a rank whose peer has `peer_batches` batches: the MAX all-reduce of
    the batch count returns the peer's count, the SUM of the totals adds nothing (the peer's share
    is zero), so this one rank runs the padding forwards of a real 2-rank evaluation."""

    class ReduceOp:
        MAX, SUM = "max", "sum"

    def __init__(self, peer_batches):
        self.peer_batches = peer_batches

    def is_initialized(self):
        return True

    def all_reduce(self, tensor, op="sum"):
        if op == "max":
            tensor.fill_(max(int(tensor.item()), self.peer_batches))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return prepare_corpus(DataConfig(dataset="path", path=CORPUS, cache_dir=cache))


def _model(backbone="gpt", block="s2moe", **moe):
    torch.manual_seed(0)
    cfg = model_preset("tiny", vocab_size=256, d_model=32, d_inner=64, max_seq_len=32, backbone=backbone,
                       moe=dict(block=block, num_experts=4, **moe))
    return build_model(cfg).eval()


# ------------------------------------------------------------------ the batches

@pytest.mark.parametrize("n,seq_len,batch,world", [(1001, 10, 3, 2), (1000, 10, 4, 3), (37, 8, 2, 1), (5, 8, 2, 3)])
def test_window_batches_equal_the_list_based_ones_and_the_limit_cuts_them(n, seq_len, batch, world):
    tokens_N = np.arange(n, dtype=np.uint16)
    for rank in range(world):
        reference = _list_eval_batches(tokens_N, seq_len, batch, rank, world)
        for limit in (None, 1, 2, len(reference) + 5):
            streamed = eval_batches(tokens_N, seq_len, batch, rank, world, limit)
            expected = reference if limit is None else reference[:limit]
            assert len(streamed) == len(expected)
            got = list(streamed)
            assert len(got) == len(expected)
            assert all(torch.equal(a, b) for g, e in zip(got, expected) for a, b in zip(g, e))
            assert all(a.dtype == b.dtype for a, b in zip(got[0], expected[0]))


@pytest.mark.parametrize("n,streams,world", [(101, 5, 1), (101, 5, 2), (98, 3, 2), (1000, 4, 3)])
def test_stream_batches_equal_the_list_based_ones_and_the_limit_cuts_them(n, streams, world):
    tokens_N = np.arange(n, dtype=np.uint16)
    for rank in range(world):
        reference = _list_stream_eval_batches(tokens_N, 8, streams, rank, world)
        for limit in (None, 1, 3):
            streamed = stream_eval_batches(tokens_N, 8, streams, rank, world, limit)
            expected = reference if limit is None else reference[:limit]
            got = list(streamed)
            assert len(streamed) == len(got) == len(expected)
            assert all(torch.equal(a, b) for g, e in zip(got, expected) for a, b in zip(g, e))


def test_batches_are_built_when_read_and_none_past_the_limit():
    tokens = _Touched(np.arange(1_000_000, dtype=np.int32))
    batches = eval_batches(tokens, 16, 4, 1, 2, max_batches=3)
    assert len(batches) == 3 and tokens.reads == 0  # nothing read before the first batch is asked for
    it = iter(batches)
    next(it)
    assert tokens.reads == 1 and tokens.highest < 2 * 4 * 17
    assert len(list(it)) == 2
    # Batch 2 of rank 1 ends at window 1 + 2*8 + 3*2 = 23: nothing of the split after it was read.
    assert tokens.reads == 3 and tokens.highest == 23 * 16 + 16
    streams = _Touched(np.arange(1_000_000, dtype=np.int32))
    segments = stream_eval_batches(streams, 16, 4, 0, 1, max_batches=2)
    assert len(list(segments)) == 2
    assert streams.highest == 3 * (999_999 // 4) + 16 + 16  # the last stream's second segment's last target


@pytest.mark.parametrize("backbone", ["gpt", "txl"])
def test_evaluation_with_a_limit_runs_and_reads_only_that_many_batches(backbone):
    model = _model(backbone)
    tokens = _Touched(np.arange(2_000_000, dtype=np.int64) % 256)
    calls = []

    def forward(x, y, m, state):
        calls.append(x.shape)
        return model(x, y, m, state)
    result = evaluate_lm(forward, model.cfg, tokens, 16, 4, 0, 1, "cpu", 10_000, "bpc", max_batches=2)
    assert len(calls) == 2
    rows, T = calls[0]
    assert result["tokens"] == 2 * rows * T
    if backbone == "gpt":  # the first 8 windows of 16 only
        assert T == 16 and tokens.highest == 8 * 16
    else:  # two segments of each stream
        streams = model.cfg.backbone_config.eval_streams
        assert rows == streams and tokens.highest == (streams - 1) * (1_999_999 // streams) + 2 * T


# ------------------------------------------------------------------ the numbers

@pytest.mark.parametrize("backbone,block", [("gpt", "s2moe"), ("gpt", "moe"), ("gpt", "dense"), ("txl", "s2moe")])
@pytest.mark.parametrize("limit", [None, 3])
def test_numbers_equal_the_list_based_evaluation_on_the_committed_corpus(corpus, backbone, block, limit):
    model = _model(backbone, block)
    valid = corpus.splits["valid"]
    for rank, world in [(0, 1), (1, 2)]:
        expected = _list_evaluate_lm(model, model.cfg, valid, 32, 4, rank, world, corpus.units["valid"], limit,
                                     lm_eval.dist)
        got = evaluate_lm(model, model.cfg, valid, 32, 4, rank, world, "cpu", corpus.units["valid"], "bpc", limit)
        assert got == expected  # bit for bit


@pytest.mark.parametrize("backbone", ["gpt", "txl"])
def test_a_rank_with_fewer_batches_pads_exactly_as_before(corpus, backbone, monkeypatch):
    model = _model(backbone)
    valid = corpus.splits["valid"]
    peer = _OtherRankHasMore(peer_batches=7)
    monkeypatch.setattr(lm_eval, "dist", peer)
    calls = []

    def forward(x, y, m, state=None):
        calls.append(int(m.sum()))
        return model(x, y, m, state)
    got = evaluate_lm(forward, model.cfg, valid, 32, 4, 0, 2, "cpu", corpus.units["valid"], "bpc", max_batches=3)
    assert calls[3:] == [0, 0, 0, 0] and all(c > 0 for c in calls[:3])  # 3 real forwards, 4 fully masked ones
    expected = _list_evaluate_lm(model, model.cfg, valid, 32, 4, 0, 2, corpus.units["valid"], 3, peer)
    assert got == expected


def test_eval_k_switched_in_place_equals_a_model_built_with_it(corpus):
    model = _model(k=2)
    valid = corpus.splits["valid"]
    routers = [b.router for b in expert_blocks(model)]
    for k in (1, 2, 3):
        separate = _model(k=2, eval_k=k)
        separate.load_state_dict(model.state_dict())
        expected = evaluate_lm(separate, separate.cfg, valid, 32, 4, 0, 1, "cpu", corpus.units["valid"], "bpc", 4)
        with experts_per_token(model, k):
            assert all(r.eval_k == k for r in routers)
            got = evaluate_lm(model, model.cfg, valid, 32, 4, 0, 1, "cpu", corpus.units["valid"], "bpc", 4)
        assert got == expected, k
        assert all(r.eval_k == 2 for r in routers)  # restored
    with pytest.raises(RuntimeError), experts_per_token(model, 1):
        raise RuntimeError("a failed evaluation")
    assert all(r.eval_k == 2 for r in routers)  # restored after an error too
