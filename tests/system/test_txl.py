"""Transformer-XL: relative attention against a direct reference, memory that carries information
across segments, ordered streams, evaluation independent of the process count, ep_size 2 against
ep_size 1 with memory, exact resume with memory, the paper's preset."""

import math

import numpy as np
import pytest
import torch

from s2moe_ds.config import ConfigError
from s2moe_ds.data import StreamBatchSampler, stream_eval_batches
from s2moe_ds.models import ModelConfig, TransformerXLConfig, build_model
from s2moe_ds.models.txl import RelativeAttention, sinusoid_KD
from s2moe_ds.moe import MoEConfig
from s2moe_ds.train import TrainerHook

from ..harness import run_distributed


def _txl(block="dense", vocab=16, d_model=32, n_layer=1, seq=8, **settings):
    return ModelConfig(backbone="txl", vocab_size=vocab, n_layer=n_layer, d_model=d_model, n_head=4, d_inner=64,
                       max_seq_len=seq, moe=MoEConfig(block=block, num_experts=4, k=2),
                       backbone_config=TransformerXLConfig(**settings))


def _reference_attention(attn, h_BTD, mem_BMD, u_Hd, v_Hd, clamp):
    """Each score from its definition, one (query, key) pair at a time, in float64."""
    B, T, D = h_BTD.shape
    H, d = attn.n_head, attn.d_head
    cat = torch.cat([mem_BMD, h_BTD], dim=1).double()
    M = mem_BMD.shape[1]
    Wq, Wk, Wv = attn.qkv.weight.double().split(H * d)
    Wr, Wo = attn.r_proj.weight.double(), attn.proj.weight.double()
    out = torch.zeros(B, T, H * d, dtype=torch.float64)
    for b in range(B):
        for head in range(H):
            sl = slice(head * d, (head + 1) * d)
            for i in range(T):
                q = (Wq @ cat[b, M + i])[sl]
                scores = []
                for j in range(M + i + 1):
                    dist = min(M + i - j, clamp) if clamp is not None else M + i - j
                    r = Wr @ sinusoid_KD(torch.tensor([dist]), D)[0].double()
                    scores.append(((q + u_Hd[head].double()) @ (Wk @ cat[b, j])[sl]
                                   + (q + v_Hd[head].double()) @ r[sl]) / math.sqrt(d))
                w = torch.softmax(torch.stack(scores), dim=0)
                out[b, i, sl] = sum(w[j] * (Wv @ cat[b, j])[sl] for j in range(M + i + 1))
    return out @ Wo.T


@pytest.mark.parametrize("clamp", [None, 3])
@pytest.mark.parametrize("d_head", [8, 5])
def test_relative_attention_equals_its_definition(clamp, d_head):
    torch.manual_seed(0)
    D, H, T, M = 16, 2, 5, 4
    attn = RelativeAttention(D, H, d_head, dropout=0.0).eval()
    h, mem = torch.randn(2, T, D), torch.randn(2, M, D)
    u, v = torch.randn(H, d_head), torch.randn(H, d_head)
    distances = torch.arange(M + T)
    if clamp is not None:
        distances = distances.clamp(max=clamp)
    got = attn(h, mem, sinusoid_KD(distances, D), u, v)
    torch.testing.assert_close(got.double(), _reference_attention(attn, h, mem, u, v, clamp), rtol=1e-4, atol=1e-5)


def _recall_loss(mem_len: int, steps: int = 150) -> float:
    """Segment 1 shows random tokens; segment 2 shows only a blank token and must name the token
    seq_len positions back, which is in the memory and nowhere else."""
    torch.manual_seed(0)
    V, T, B = 16, 8, 32
    model = build_model(_txl(vocab=V, seq=T, mem_len=mem_len))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    blank = torch.zeros(B, T, dtype=torch.long)
    for _ in range(steps):
        a = torch.randint(1, V, (B, T), generator=g)
        state = model(a, a, torch.zeros(B, T), None).state
        loss = model(blank, a, None, state).task_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_memory_carries_information_across_segments():
    chance = math.log(15)
    assert _recall_loss(mem_len=8) < 0.3 * chance
    assert _recall_loss(mem_len=0) > 0.9 * chance


def test_memory_is_the_layer_inputs_of_the_last_mem_len_positions_without_gradient():
    torch.manual_seed(0)
    model = build_model(_txl(n_layer=2, mem_len=6)).eval()
    x = torch.randint(0, 16, (2, 8))
    state = model(x).state
    assert len(state) == 2 and all(m.shape == (2, 6, 32) and not m.requires_grad for m in state)
    # Layer 0's memory is the scaled embedding of the segment's last 6 tokens.
    torch.testing.assert_close(state[0], model.tok_emb(x[:, -6:]) * math.sqrt(32))
    # eval_mem_len sets evaluation's memory apart from training's.
    model = build_model(_txl(n_layer=2, mem_len=6, eval_mem_len=3)).eval()
    assert model(x).state[0].shape == (2, 3, 32)
    assert model.train()(x).state[0].shape == (2, 6, 32)


def test_state_of_other_streams_is_refused():
    model = build_model(_txl(mem_len=4))
    state = model(torch.zeros(2, 8, dtype=torch.long)).state
    with pytest.raises(ValueError, match="state: expected 1 memories of batch 3"):
        model(torch.zeros(3, 8, dtype=torch.long), state=state)


def test_stream_sampler_reads_each_rows_stream_in_order_and_restarts():
    tokens = np.arange(100)
    samplers = [StreamBatchSampler(tokens, seq_len=4, batch_size=2, rank=r, world_size=2) for r in range(2)]
    # 4 streams of 25 tokens; rank r has streams 2r and 2r+1; 6 segments of 4 (+1) per epoch.
    assert samplers[0].batches_per_epoch == 6
    x, y = samplers[1].next_batch()
    assert x.tolist() == [[50, 51, 52, 53], [75, 76, 77, 78]] and y.tolist() == [[51, 52, 53, 54], [76, 77, 78, 79]]
    assert samplers[1].restarted
    x, _ = samplers[1].next_batch()
    assert x[:, 0].tolist() == [54, 79] and not samplers[1].restarted
    for _ in range(4):
        samplers[1].next_batch()
    x, _ = samplers[1].next_batch()
    assert x[:, 0].tolist() == [50, 75] and samplers[1].restarted and samplers[1].epoch == 1
    resumed = StreamBatchSampler(tokens, seq_len=4, batch_size=2, rank=1, world_size=2)
    resumed.load_state_dict(samplers[1].state_dict())
    assert torch.equal(resumed.next_batch()[0], samplers[1].next_batch()[0])
    other = StreamBatchSampler(tokens, seq_len=4, batch_size=4, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="each rank's memory belongs to its streams"):
        other.load_state_dict(samplers[0].state_dict())


@pytest.mark.parametrize("n", [101, 98])
def test_stream_evaluation_predicts_every_token_once_whatever_the_process_count(n):
    tokens = np.arange(n)

    def per_stream(world):
        rows = {}
        for rank in range(world):
            for x, y, m in stream_eval_batches(tokens, 8, streams=5, rank=rank, world_size=world):
                for row, s in enumerate(range(rank, 5, world)):
                    rows.setdefault(s, []).append((x[row].tolist(), y[row].tolist(), m[row].tolist()))
        return rows
    one, two = per_stream(1), per_stream(2)
    assert one == two
    targets = sorted(t for segments in one.values() for _, y, m in segments for t, keep in zip(y, m) if keep)
    assert targets == list(range(1, n))
    shapes = {tuple(x.shape) for r in range(2) for x, _, _ in stream_eval_batches(tokens, 8, 5, r, 2)}
    assert shapes == {(3, 8)}


def _ep_worker(rank, world_size):
    from s2moe_ds.eval import evaluate_lm
    from s2moe_ds.parallel import ExpertLayout
    cfg = _txl(block="s2moe", n_layer=2, mem_len=6, eval_streams=3)
    torch.manual_seed(0)
    ref = build_model(cfg)
    torch.manual_seed(0)
    ep = build_model(cfg, _EP2)
    layout = ExpertLayout.from_process_groups(4, world_size)
    global_state = ref.state_dict()
    ep.load_state_dict({n: global_state[layout.global_param_name(n)] for n in ep.state_dict()})
    for model in (ref, ep):
        for layer in model.layers:
            layer.ffn.set_deepspeed_parallelism()
    g = torch.Generator().manual_seed(10 + rank)
    segments = [torch.randint(0, 16, (2, 8), generator=g) for _ in range(3)]
    results = {}
    for name, model in (("ref", ref), ("ep", ep)):
        model.train()
        torch.manual_seed(5 + rank)
        state, total = None, 0
        for x in segments:
            out = model(x, x.roll(-1, 1), None, state)
            state = out.state
            total = total + out.task_loss
        total.backward()
        results[name] = (total.detach(), [m.detach() for m in state],
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results["ep"][0], results["ref"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results["ep"][1], results["ref"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    import deepspeed.comm as dist
    ref_grads = results["ref"][2]
    for n in ref_grads:
        if "experts" in n:
            dist.all_reduce(ref_grads[n])
    for n, grad in results["ep"][2].items():
        torch.testing.assert_close(grad, ref_grads[layout.global_param_name(n)], rtol=1e-4, atol=1e-5)
    ep.eval()
    tokens = np.arange(300) % 13
    return evaluate_lm(lambda x, y, m, s: ep(x, y, m, s), cfg, tokens, 8, 4, rank, world_size, "cpu", 300, "bpc")


class _EP2:
    ep_size = 2


def test_ep2_matches_ep1_with_memory_and_evaluation_does_not_depend_on_the_process_count():
    from s2moe_ds.eval import evaluate_lm
    results = run_distributed(_ep_worker, world_size=2)
    torch.manual_seed(0)
    cfg = _txl(block="s2moe", n_layer=2, mem_len=6, eval_streams=3)
    single = build_model(cfg).eval()
    tokens = np.arange(300) % 13
    alone = evaluate_lm(lambda x, y, m, s: single(x, y, m, s), cfg, tokens, 8, 4, 0, 1, "cpu", 300, "bpc")
    assert results[0]["bpc"] == results[1]["bpc"]
    assert results[0]["bpc"] == pytest.approx(alone["bpc"], abs=1e-6)
    assert results[0]["tokens"] == alone["tokens"] == 299


def test_txl_base_preset_has_the_papers_transformer_xl_size():
    from s2moe_ds.train import PRESETS
    exp = PRESETS["txl-base"]()
    cfg = ModelConfig(**{**exp.model.to_dict(), "vocab_size": 204})  # enwik8's symbols in Transformer-XL
    s = cfg.backbone_config
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, s.d_head, cfg.d_inner, cfg.moe.num_experts, cfg.moe.k,
            s.mem_len, exp.train.seq_len, exp.train.lr, exp.train.max_steps) == \
        (4, 256, 8, 64, 512, 16, 2, 512, 512, 3.5e-4, 100_000)
    L, d, H, dh, f, E, V = 4, 256, 8, 64, 512, 16, 204
    # Transformer-XL's parameters at that size: tied embedding and output bias; per layer q/k/v, the
    # distance projection and the output projection (no biases), two layer norms, E expert FFNs and
    # a linear router (DeepSpeed's has no bias) and S2MoE's mixing gate; the two global position biases.
    assert cfg.moe.block == "s2moe"
    expected = V * d + V + L * (3 * d * H * dh + d * H * dh + H * dh * d + 2 * 2 * d
                                + E * (d * f + f + f * d + d) + d * E + (d + 1)) + 2 * H * dh
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_flops_count_attention_over_memory():
    from s2moe_ds.eval.flops import flops_per_token
    no_mem = flops_per_token(_txl(seq=64, mem_len=0), 64)["attention"]
    mem = flops_per_token(_txl(seq=64, mem_len=64), 64)["attention"]
    eval_short = flops_per_token(_txl(seq=64, mem_len=64, eval_mem_len=16), 64)["attention"]
    assert no_mem < eval_short < mem
    d, T, M = 32, 64, 64
    assert mem == 4 * d * d + 6 * d * d * (M + T) / T + 4 * (M + (T + 1) / 2) * d + 2 * (M + T) * d


def _train_worker(rank, world_size, text, out_dir, cache, train_kw):
    from s2moe_ds.train import model_preset, pretrain

    from .test_pretrain import _ds_config, _experiment
    model = model_preset("txl-tiny", d_model=32, d_inner=64, max_seq_len=16, dropout=0.1,
                         moe=dict(num_experts=4), backbone_config=dict(mem_len=16, eval_tgt_len=8, eval_streams=3))
    experiment = _experiment(model, world_size, text, cache, out_dir=out_dir, seq_len=16, warmup_steps=2,
                             eval_interval=3, save_interval=3, log_interval=1, **train_kw)
    return pretrain(experiment, _ds_config(), hooks=(_MemoryProbe(),))


class _MemoryProbe(TrainerHook):
    """Records, after each step, whether the task carries memory into the next one."""

    def on_step_end(self, trainer, step):
        trainer.final.setdefault("memory", []).append(trainer.task.state is not None)


def test_training_carries_memory_and_resumes_exactly_with_it(tmp_path):
    import os

    from s2moe_ds.checkpoint import load_model
    from s2moe_ds.data import DataConfig, prepare_corpus
    from s2moe_ds.eval import evaluate_lm

    from .test_pretrain import TEXT
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    cache = str(tmp_path / "cache")
    straight = run_distributed(_train_worker, 2, (str(text), str(tmp_path / "a"), cache, dict(max_steps=6)))
    first = run_distributed(_train_worker, 2, (str(text), str(tmp_path / "b"), cache, dict(max_steps=6, stop_after=3)))
    assert os.path.isfile(tmp_path / "b" / "checkpoints" / "step00000003" / "state_rank1.pt")
    second = run_distributed(_train_worker, 2, (str(text), str(tmp_path / "b"), cache, dict(max_steps=6, resume=True)))
    for rank in range(2):
        assert straight[rank]["memory"] == [True] * 6
        resumed = first[rank]["losses"] + second[rank]["losses"]
        assert max(abs(a - b) for a, b in zip(resumed, straight[rank]["losses"])) < 1e-6, (resumed, straight)
    # The same checkpoint evaluated on one process gives the two-process loop's validation BPC.
    model, client = load_model(str(tmp_path / "b"))
    corpus = prepare_corpus(DataConfig(dataset="path", path=str(text), cache_dir=cache))
    alone = evaluate_lm(lambda x, y, m, s: model(x, y, m, s), model.cfg, corpus.splits["valid"], 16, 4, 0, 1, "cpu",
                        corpus.units["valid"], corpus.metric)
    assert alone["bpc"] == pytest.approx(second[0]["valid"]["bpc"], abs=1e-5)
    assert second[0]["valid"]["bpc"] == pytest.approx(straight[0]["valid"]["bpc"], abs=1e-6)


def test_bad_settings_name_the_field_before_any_compute():
    with pytest.raises(ConfigError, match="model.backbone_config.eval_tgt_len: 32 exceeds model.max_seq_len 8"):
        _txl(eval_tgt_len=32)
    with pytest.raises(ConfigError, match="model.backbone_config.mem_len"):
        _txl(mem_len=-1)
    with pytest.raises(ConfigError, match="model.backbone_config"):
        ModelConfig(backbone="gpt", backbone_config={"mem_len": 4})
    with pytest.raises(ConfigError, match="model.backbone: .*'gpt', 'txl'"):
        ModelConfig(backbone="rnn")


def test_generation_reads_the_prompt_into_memory_then_samples_token_by_token():
    from dataclasses import replace
    torch.manual_seed(0)
    cfg = _txl(block="s2moe", n_layer=2, seq=8, mem_len=12)
    # One expert per token: DeepSpeed's top-1 gating, which refuses fewer tokens than min_capacity
    # (4) unless the router lowers it, as two sequences of one token are.
    model = build_model(replace(cfg, moe=replace(cfg.moe, eval_k=1))).eval()
    prompt = torch.randint(0, 16, (2, 11))
    out = model.generate(prompt, 5, generator=torch.Generator().manual_seed(3))
    assert out.shape == (2, 16) and torch.equal(out[:, :11], prompt)
    again = model.generate(prompt, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    # The first new token comes from the prompt's last logits, computed with the prompt's memory.
    state = model(prompt[:, :8]).state
    logits = model(prompt[:, 8:], state=state).logits[:, -1]
    from s2moe_ds.models.base import sample_next
    assert torch.equal(out[:, 11:12], sample_next(logits, 1.0, None, torch.Generator().manual_seed(3)))
