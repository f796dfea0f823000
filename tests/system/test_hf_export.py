"""The Hugging Face export (launch/consolidate.py --format hf), loaded the documented way, which
runs no Python of the folder: Transformers' Auto classes after `import s2moe_ds.hf`, with no
trust_remote_code, give our logits with one and with two experts per token (Transformer-XL over
several segments too), our ids and our greedy continuation; lm-evaluation-harness's model `s2moe`
gives our log-likelihoods and scores a local text file. The export holds no .py file unless asked
(--remote-code-shims), and a folder with planted .py files is loaded without running them."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from s2moe_ds.checkpoint import load_model
from s2moe_ds.data import load_tokenizer

from ..harness import run_distributed
from .test_pretrain import TEXT, _ds_config, _experiment
from s2moe_ds.train import model_preset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONSOLIDATE = os.path.join(ROOT, "launch", "consolidate.py")
STEPS = 12
STEP = f"step{STEPS:08d}"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
# The export's files as Transformers' trust_remote_code knows them, and what of them we write.
SHIMS = ("configuration_s2moe.py", "modeling_s2moe.py", "tokenization_s2moe.py")


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


def _python(code_or_module, *args, cwd, env=None, module=False):
    flag = "-m" if module else "-c"
    return subprocess.run([sys.executable, flag, code_or_module, *map(str, args)], capture_output=True, text=True,
                          env=env or OFFLINE, timeout=600, cwd=str(cwd))


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
    # What the user reads: the safe way to load, and the warning.
    assert "import s2moe_ds.hf" in done.stdout and "no trust_remote_code" in done.stdout, done.stdout
    assert "python -m s2moe_ds.hf.lm_eval --model s2moe" in done.stdout, done.stdout
    # The task folder lies beside the export, never in it (a task folder can run Python).
    assert f"--include_path {root / 'hf-lm_eval_tasks'} " in done.stdout and "lm_eval_tasks" not in os.listdir(out)
    return root / "run", out, corpus, final


# The documented way, in a fresh interpreter: import s2moe_ds.hf, then Transformers' Auto classes
# with no trust_remote_code. One interpreter per export loads it with each eval_k.
_LOAD = r"""
import json, sys, torch
import s2moe_ds.hf
from transformers import AutoModelForCausalLM, AutoTokenizer
path, text, n_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(path)
ids = tok(text, return_tensors="pt").input_ids
out = {"ids": ids[0].tolist(), "decoded": tok.decode(ids[0]), "eos": tok.eos_token_id}
for eval_k in (1, 2):
    model = AutoModelForCausalLM.from_pretrained(path, eval_k=eval_k)
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
    done = _python(_LOAD, out, text, 0 if memory else 12, cwd=out.parent)
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


def _our_model(run, eval_k):
    model, _ = load_model(str(run), eval_k=eval_k)
    tokenizer = load_tokenizer(os.path.join(run, "checkpoints", STEP, "tokenizer.json"))
    return model, tokenizer


def test_export_holds_no_python(export):
    _, out, _, _ = export
    assert not [f for f in os.listdir(out) if f.endswith(".py")], os.listdir(out)
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((out / name).read_text()), name


def test_remote_code_shims_are_opt_in(export, tmp_path):
    """--remote-code-shims writes the files trust_remote_code loads, and a process that never
    imports s2moe_ds gets our model and tokenizer through them."""
    run, out, _, _ = export
    shimmed = tmp_path / "shimmed"
    done = _consolidate(str(run), "--format", "hf", "--out", str(shimmed), "--remote-code-shims")
    assert done.returncode == 0, done.stderr
    assert sorted(f for f in os.listdir(shimmed) if f.endswith(".py")) == sorted(SHIMS)
    assert "AutoModelForCausalLM" in json.loads((shimmed / "config.json").read_text())["auto_map"]
    assert "AutoTokenizer" in json.loads((shimmed / "tokenizer_config.json").read_text())["auto_map"]
    code = ("import sys, transformers as t; p = sys.argv[1]; "
            "m = t.AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True); "
            "k = t.AutoTokenizer.from_pretrained(p, trust_remote_code=True); "
            "print(type(m).__module__, type(k).__module__, 's2moe_ds' in sys.modules)")
    done = _python(code, shimmed, cwd=tmp_path, env={**OFFLINE, "HF_HOME": str(tmp_path / "hf_home")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["s2moe_ds.hf.modeling", "s2moe_ds.hf.tokenizer", "True"], done.stdout


def _plant(out, folder, marker):
    """A copy of the export as someone else might hand it over: auto_map entries and .py files
    that would write `marker` when run."""
    shutil.copytree(out, folder)
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    for name, cls in zip(SHIMS, ("S2MoEConfig", "S2MoEForCausalLM", "S2MoETokenizer")):
        module = "tokenizer" if name.startswith("tokenization") else "modeling"
        (folder / name).write_text(payload + f"from s2moe_ds.hf.{module} import {cls}\n")
    for name, auto_map in (("config.json", {"AutoConfig": "configuration_s2moe.S2MoEConfig",
                                            "AutoModelForCausalLM": "modeling_s2moe.S2MoEForCausalLM"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["tokenization_s2moe.S2MoETokenizer", None]})):
        cfg = json.loads((folder / name).read_text())
        cfg["auto_map"] = auto_map
        (folder / name).write_text(json.dumps(cfg))


def test_planted_python_is_not_run(export, loaded, tmp_path):
    """The documented ways (the Auto classes after import s2moe_ds.hf; lm_eval's --model s2moe)
    load a folder with planted .py files and auto_map without running them, and give the same
    logits; --model s2moe refuses trust_remote_code=True."""
    run, out, _, _ = export
    if load_model(str(run))[0].cfg.has_memory:
        pytest.skip("the folder's files, not the backbone, are under test: shown on GPT")
    text, clean = loaded
    folder, marker = tmp_path / "theirs", tmp_path / "payload_ran"
    tasks = out.parent / f"{out.name}-lm_eval_tasks"  # ours, beside the export we wrote
    _plant(out, folder, marker)
    env = {**OFFLINE, "HF_HOME": str(tmp_path / "hf_home")}
    done = _python(_LOAD, folder, text, 0, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    assert json.loads(done.stdout)["1"]["logits"] == clean[1]["logits"]
    done = _python("s2moe_ds.hf.lm_eval", "--model", "s2moe", "--model_args", f"pretrained={folder},dtype=float32",
                   "--include_path", tasks, "--tasks", "s2moe_text", "--device", "cpu",
                   "--batch_size", "4", "--limit", "1", cwd=tmp_path, env=env, module=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    done = _python("s2moe_ds.hf.lm_eval", "--model", "s2moe", "--model_args",
                   f"pretrained={folder},trust_remote_code=True", "--tasks", "s2moe_text", "--include_path",
                   tasks, cwd=tmp_path, env=env, module=True)
    assert done.returncode == 2 and "trust_remote_code" in done.stderr, done.stderr[-3000:]
    assert not marker.exists()
    # The planted code is live: trust_remote_code=True runs it.
    done = _python("import sys, transformers as t; t.AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)",
                   folder, cwd=tmp_path, env=env)
    assert done.returncode == 0 and marker.exists(), done.stderr[-3000:]


@pytest.mark.parametrize("eval_k", [1, 2])
def test_lm_eval_gives_our_loglikelihoods(export, eval_k):
    """lm_eval's model `s2moe` (registered by importing s2moe_ds.hf.lm_eval), batched with right
    padding: each continuation's log-likelihood and greediness are ours."""
    pytest.importorskip("lm_eval")
    import s2moe_ds.hf.lm_eval  # noqa: F401
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    run, out, _, _ = export
    lm = get_model("s2moe")(pretrained=str(out), dtype="float32", device="cpu", batch_size=3, eval_k=eval_k)
    pairs = [("It was the", " best of"), ("it was the age of", " wisdom, it was"), ("the worst of times, it", " w"),
             ("", "It was")]
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    model, tokenizer = _our_model(run, eval_k)
    eos = int(tokenizer.encode("\n")[0])
    for (context, continuation), (logp, greedy) in zip(pairs, theirs):
        # lm_eval's split: the ids of the whole text after those of the context; an empty context
        # is the newline that stands for a text's start.
        ctx = tokenizer.encode(context).tolist()
        cont = tokenizer.encode(context + continuation).tolist()[len(ctx):] if ctx else tokenizer.encode(continuation).tolist()
        ctx = ctx or [eos]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp_TV = torch.log_softmax(model(ids[:, :-1]).logits[0, len(ctx) - 1:].double(), dim=-1)
        ours = float(logp_TV[torch.arange(len(cont)), cont].sum())
        assert logp == pytest.approx(ours, abs=1e-4), (context, continuation)
        assert greedy == bool((logp_TV.argmax(-1) == torch.tensor(cont)).all())


def test_lm_eval_scores_a_local_file(export):
    pytest.importorskip("lm_eval")
    run, out, corpus, _ = export
    if (run / "checkpoints").exists() and load_model(str(run))[0].cfg.has_memory:
        pytest.skip("lm_eval reads windows without memory: compared on the memoryless backbone")
    tasks = out.parent / f"{out.name}-lm_eval_tasks"
    results = out.parent / "lm_eval_results"
    done = _python("s2moe_ds.hf.lm_eval", "--model", "s2moe", "--model_args", f"pretrained={out},dtype=float32,eval_k=1",
                   "--include_path", tasks, "--tasks", "s2moe_text", "--device", "cpu", "--batch_size", "4",
                   "--output_path", results, cwd=out.parent, module=True)
    assert done.returncode == 0, done.stderr[-4000:]
    files = [os.path.join(d, f) for d, _, fs in os.walk(results) for f in fs if f.endswith(".json")]
    assert files, done.stdout[-2000:]
    scores = json.load(open(files[0]))["results"]["s2moe_text"]
    bpb = scores["bits_per_byte,none"]
    # Our model's log-likelihood of the file in lm_eval's windows (its own window function): the
    # first starts from the newline that stands for the text's start, each later one predicts the
    # next max_seq_len tokens given the token before them.
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    model, tokenizer = _our_model(run, eval_k=1)
    text = corpus.read_text()
    ids = tokenizer.encode(text).tolist()
    windows = get_rolling_token_windows(ids, prefix_token=int(tokenizer.encode("\n")[0]), max_seq_len=32, context_len=1)
    ll = 0.0
    with torch.no_grad():
        for ctx, cont in map(make_disjoint_window, windows):
            logp_TV = torch.log_softmax(model(torch.tensor([(ctx + cont)[:-1]])).logits[0, len(ctx) - 1:].double(), -1)
            ll += float(logp_TV[torch.arange(len(cont)), cont].sum())
    ours = -ll / len(text.encode()) / 0.6931471805599453
    print(f"lm_eval bits_per_byte {bpb:.6f}, ours {ours:.6f}")
    assert 1.0 < bpb < 8.0 and bpb == pytest.approx(ours, rel=1e-6), (bpb, ours)


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
    done = _consolidate(str(run), "--out", str(tmp_path / "m.pt"), "--remote-code-shims")
    assert done.returncode == 2 and "--remote-code-shims" in done.stderr and "--format hf" in done.stderr
    assert not (tmp_path / "m.pt").exists()


# ------------------------------------------------------------------- received files (issue 24 review)


@pytest.mark.parametrize("plant", ["python", "function", "python_tag", "include_outside", "link"])
def test_lm_eval_refuses_a_task_folder_that_would_run_python(tmp_path, plant):
    """A task folder as it might come with someone's export: python -m s2moe_ds.hf.lm_eval refuses it
    (status 2, naming the file) before lm_eval loads any task, and its Python never runs."""
    pytest.importorskip("lm_eval")
    tasks, marker = tmp_path / "their_tasks", tmp_path / "payload_ran"
    tasks.mkdir()
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\ndef fn(x):\n    return x\n"
    task = "task: planted\ndataset_path: text\noutput_type: loglikelihood_rolling\n"
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("doc_to_text: !function mod.fn\n")
    (tmp_path / "mod.py").write_text(payload)
    if plant == "python":
        (tasks / "mod.py").write_text(payload)
        (tasks / "planted.yaml").write_text(task)
        culprit = "mod.py"
    elif plant == "function":
        (tasks / "planted.yaml").write_text(task + "process_docs: !function os.system\n")
        culprit = "planted.yaml"
    elif plant == "python_tag":
        (tasks / "planted.yaml").write_text(task + f"x: !!python/object/apply:os.system ['touch {marker}']\n")
        culprit = "planted.yaml"
    elif plant == "include_outside":
        (tasks / "planted.yaml").write_text(f"include: {outside}\n" + task)
        culprit = "planted.yaml"
    else:
        (tasks / "planted.yaml").symlink_to(outside)
        culprit = "planted.yaml"
    done = _python("s2moe_ds.hf.lm_eval", "--model", "s2moe", "--model_args", f"pretrained={tmp_path / 'nowhere'}",
                   "--include_path", tasks, "--tasks", "planted", "--device", "cpu", cwd=tmp_path, module=True)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: --include_path:" in done.stderr and culprit in done.stderr, done.stderr[-3000:]
    assert "task folder you wrote" in done.stderr
    assert not marker.exists()


def test_the_task_folder_is_written_beside_the_export_and_passes_the_check(tmp_path):
    """--lm-eval-text's folder is <out>-lm_eval_tasks, not inside the export, and is one the
    lm_eval command accepts; a folder of that name holding someone's files is not written into."""
    from s2moe_ds.config import ConfigError
    from s2moe_ds.hf import write_lm_eval_task
    from s2moe_ds.hf.lm_eval.task_sources import check_task_sources
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    folder = write_lm_eval_task(str(text), str(tmp_path / "hf"))
    assert folder == str(tmp_path / "hf-lm_eval_tasks") and os.listdir(folder) == ["s2moe_text.yaml"]
    assert not (tmp_path / "hf").exists()
    check_task_sources(folder)
    (tmp_path / "hf-lm_eval_tasks" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="hf-lm_eval_tasks holds notes.txt, which consolidate did not write"):
        write_lm_eval_task(str(text), str(tmp_path / "hf"))


def test_a_tokenizer_config_cannot_point_outside_its_folder(tmp_path, monkeypatch):
    """tokenizer_config.json's vocab_file naming a file elsewhere (here a valid vocabulary, so
    only the check stops it; a FIFO would hang the open) is never opened, by our class or by
    AutoTokenizer. Transformers 4.x passes that vocab_file on, and we refuse it naming the file
    and the fix; 5.x passes the folder's own file, which loads."""
    from transformers import AutoTokenizer

    import s2moe_ds.hf.tokenizer as hf_tokenizer
    from s2moe_ds.config import ConfigError
    from s2moe_ds.data import ByteTokenizer
    from s2moe_ds.hf import S2MoETokenizer
    ByteTokenizer().save(str(tmp_path / "elsewhere.json"))
    S2MoETokenizer(vocab_file=str(tmp_path / "elsewhere.json")).save_pretrained(str(tmp_path / "export"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "export")).vocab_size == 256  # its own file: fine
    opened = []
    load = hf_tokenizer.load_tokenizer
    monkeypatch.setattr(hf_tokenizer, "load_tokenizer", lambda path: opened.append(os.path.realpath(path)) or load(path))
    cfg_path = tmp_path / "export" / "tokenizer_config.json"
    for target in (str(tmp_path / "elsewhere.json"), "../elsewhere.json"):
        cfg = json.loads(cfg_path.read_text())
        cfg["vocab_file"] = target
        cfg_path.write_text(json.dumps(cfg))
        for loader in (S2MoETokenizer.from_pretrained, AutoTokenizer.from_pretrained):
            try:
                loaded = loader(str(tmp_path / "export"))
            except ConfigError as e:
                assert re.search(r"tokenizer_config.json: vocab_file .* is outside the tokenizer's folder "
                                 r".*remove vocab_file from tokenizer_config.json", str(e)), str(e)
            else:
                assert loaded.vocab_size == 256
    assert all(os.path.dirname(p) == os.path.realpath(tmp_path / "export") for p in opened), opened
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cfg["vocab_file"] = str(fifo)
    cfg_path.write_text(json.dumps(cfg))
    code = "import sys, s2moe_ds.hf, transformers as t; t.AutoTokenizer.from_pretrained(sys.argv[1])"
    done = _python(code, tmp_path / "export", cwd=tmp_path)  # a blocked open would time out (600 s)
    assert done.returncode == 0 or "is outside the tokenizer's folder" in done.stderr, done.stderr[-2000:]
