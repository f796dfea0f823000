"""The Hugging Face export (launch/consolidate.py --format hf): Transformers loads it through
trust_remote_code in a process that never imports s2moe_ds itself, its logits equal ours with one
and with two experts per token (Transformer-XL over several segments too), its tokenizer gives our
ids, greedy generation matches ours, and lm-evaluation-harness scores a local text file with it."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from s2moe_ds.checkpoint import load_model
from s2moe_ds.data import load_tokenizer

from .harness import run_distributed
from .test_pretrain import TEXT, _ds_config, _experiment
from s2moe_ds.train import model_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSOLIDATE = os.path.join(ROOT, "launch", "consolidate.py")
STEPS = 12
STEP = f"step{STEPS:08d}"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize("kind", ["byte", "char", "subword"])
def test_tokenizer_gives_our_ids(kind, tmp_path):
    from s2moe_ds.data import ByteTokenizer, CharTokenizer
    from s2moe_ds.hf import S2MoETokenizer
    text = "Wherefore art thou, Romeo?\n  Grüße, naïve café 東京\n\nend"
    ours = {"byte": ByteTokenizer(), "char": CharTokenizer.from_text(TEXT + "\n", "test"),
            "subword": load_tokenizer(os.path.join(ROOT, "tokenizers", "embedded_bpe.json"))}[kind]
    ours.save(str(tmp_path / "tok.json"))
    theirs = S2MoETokenizer(vocab_file=str(tmp_path / "tok.json"))
    theirs.save_pretrained(str(tmp_path / "saved"))
    again = S2MoETokenizer.from_pretrained(str(tmp_path / "saved"))
    for tok in (theirs, again):
        assert tok.vocab_size == ours.vocab_size and len(set(tok.get_vocab().values())) == ours.vocab_size
        assert tok(text).input_ids == ours.encode(text).tolist()
        assert tok.decode(tok(text).input_ids) == ours.decode(ours.encode(text))
        assert tok.eos_token_id == int(ours.encode("\n")[0])
        batch = tok([text, "ab"], padding=True, return_tensors="pt")
        assert batch.attention_mask[1].tolist() == [1] * len(ours.encode("ab")) + [0] * (batch.input_ids.shape[1] - len(ours.encode("ab")))


def _train_worker(rank, world_size, text, out_dir, cache, backbone):
    from s2moe_ds.train import pretrain
    extra = dict(backbone="txl", backbone_config={"mem_len": 16}) if backbone == "txl" else {}
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32, moe=dict(num_experts=4), **extra)
    train = dict(out_dir=out_dir, seq_len=32, max_steps=STEPS, warmup_steps=2, eval_interval=0, save_interval=STEPS)
    return pretrain(_experiment(model, world_size, text, cache, **train), _ds_config())


def _consolidate(*args):
    return subprocess.run([sys.executable, CONSOLIDATE, *args], capture_output=True, text=True, env=OFFLINE,
                          timeout=300)


@pytest.fixture(scope="module", params=["gpt", "txl"])
def export(request, tmp_path_factory):
    """(run folder, export folder, corpus path) of a 2-rank ep_size-2 run, exported."""
    root = tmp_path_factory.mktemp(f"hf_{request.param}")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    final = run_distributed(_train_worker, 2, (str(corpus), str(root / "run"), str(root / "cache"), request.param))[0]
    out = root / "hf"
    done = _consolidate(str(root / "run"), "--format", "hf", "--out", str(out), "--lm-eval-text", str(corpus))
    assert done.returncode == 0, done.stderr
    return root / "run", out, corpus, final


# Run in a fresh interpreter that imports only transformers: the export must carry what it needs.
# One interpreter per export loads it with each eval_k.
_LOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, text, n_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
ids = tok(text, return_tensors="pt").input_ids
out = {"ids": ids[0].tolist(), "decoded": tok.decode(ids[0]), "eos": tok.eos_token_id}
for eval_k in (1, 2):
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, eval_k=eval_k)
    with torch.no_grad():
        logits = model(ids).logits
    out[eval_k] = {"logits": logits[0].tolist(), "training": model.training}
    if n_new:
        out[eval_k]["generated"] = model.generate(ids[:, :8], max_new_tokens=n_new, do_sample=False)[0].tolist()
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def loaded(export):
    """What Transformers gives for the export: ids, decoding, and per eval_k the logits (and for
    GPT a greedy continuation). Transformer-XL reads its text in 3 segments of 32 with its memory."""
    run, out, _, _ = export
    memory = load_model(str(run))[0].cfg.has_memory
    text = TEXT[: 3 * 32 if memory else 32]
    done = subprocess.run([sys.executable, "-c", _LOAD, str(out), text, "0" if memory else "12"],
                          capture_output=True, text=True, env=OFFLINE, timeout=300, cwd=str(out.parent))
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout)
    return text, {**theirs, 1: theirs["1"], 2: theirs["2"]}


@pytest.mark.parametrize("eval_k", [1, 2])
def test_transformers_gives_our_logits(export, loaded, eval_k):
    run, _, _, _ = export
    text, theirs = loaded
    model, _ = load_model(str(run), eval_k=eval_k)
    tokenizer = load_tokenizer(os.path.join(run, "checkpoints", STEP, "tokenizer.json"))
    ids = torch.as_tensor(tokenizer.encode(text)).reshape(1, -1)
    assert theirs["ids"] == ids[0].tolist() and theirs["decoded"] == text and not theirs[eval_k]["training"]
    with torch.no_grad():
        if model.cfg.has_memory:
            state, ours = None, []
            for seg in ids.split(32, dim=1):
                o = model(seg, state=state)
                state = o.state
                ours.append(o.logits)
            ours = torch.cat(ours, dim=1)
        else:
            ours = model(ids).logits
    got = torch.tensor(theirs[eval_k]["logits"])
    assert torch.equal(got, ours[0]), (got - ours[0]).abs().max()
    if "generated" in theirs[eval_k]:
        greedy = model.generate(ids[:, :8], 12, top_k=1)
        assert theirs[eval_k]["generated"] == greedy[0].tolist()


def test_one_and_two_experts_differ(loaded):
    """eval_k reaches the routers: the two evaluations are not the same function."""
    _, theirs = loaded
    assert torch.tensor(theirs[1]["logits"]).sub(torch.tensor(theirs[2]["logits"])).abs().max() > 1e-4


def test_lm_eval_scores_a_local_file(export):
    pytest.importorskip("lm_eval")
    run, out, corpus, _ = export
    if (run / "checkpoints").exists() and load_model(str(run))[0].cfg.has_memory:
        pytest.skip("lm_eval reads windows without memory: compared on the memoryless backbone")
    tasks = out / "lm_eval_tasks"
    results = out.parent / "lm_eval_results"
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={out},trust_remote_code=True,dtype=float32", "--include_path", str(tasks),
         "--tasks", "s2moe_text", "--device", "cpu", "--batch_size", "4", "--output_path", str(results)],
        capture_output=True, text=True, env=OFFLINE, timeout=600, cwd=str(out.parent))
    assert done.returncode == 0, done.stderr[-4000:]
    files = [os.path.join(d, f) for d, _, fs in os.walk(results) for f in fs if f.endswith(".json")]
    assert files, done.stdout[-2000:]
    scores = json.load(open(files[0]))["results"]["s2moe_text"]
    bpb = scores["bits_per_byte,none"]
    # Our own evaluation of the same model on the same text, in the same disjoint windows of the
    # context length (lm_eval's first window starts from the newline that stands for the text's
    # start; ours from the text's first character): near, not identical.
    model, _ = load_model(str(run))
    tokenizer = load_tokenizer(os.path.join(run, "checkpoints", STEP, "tokenizer.json"))
    ids = torch.as_tensor(tokenizer.encode(corpus.read_text()))
    nll = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 32):
            x = ids[start:start + 32][None]
            y = ids[start + 1:start + 33][None]
            x = x[:, :y.shape[1]]
            nll.append(torch.nn.functional.cross_entropy(model(x).logits[0], y[0], reduction="sum"))
    ours = float(sum(nll)) / (len(ids) - 1) / 0.6931471805599453
    print(f"lm_eval bits_per_byte {bpb:.4f}, ours {ours:.4f}")
    assert 1.0 < bpb < 8.0 and bpb == pytest.approx(ours, rel=0.01), (bpb, ours)


def test_export_refuses_what_it_cannot_write(export, tmp_path):
    run, _, corpus, _ = export
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    done = _consolidate(str(run), "--format", "hf", "--out", str(foreign))
    assert done.returncode == 2 and "--out" in done.stderr and (foreign / "todo.txt").exists()
    done = _consolidate(str(run), "--out", str(tmp_path / "m.pt"), "--lm-eval-text", str(corpus))
    assert done.returncode == 2 and "--lm-eval-text" in done.stderr and "--format hf" in done.stderr
    done = _consolidate(str(run), "--format", "hf", "--out", str(tmp_path / "x"), "--lm-eval-text",
                        str(tmp_path / "missing.txt"))
    assert done.returncode == 2 and "missing.txt" in done.stderr and not (tmp_path / "x").exists()
