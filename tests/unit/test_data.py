"""Data layer: config validation, corpora (embedded, local, saved datasets), the token cache, samplers."""

import os

import numpy as np
import pytest
import torch

from s2moe_ds.config import ConfigError
from s2moe_ds.data import ContiguousBatchSampler, DataConfig, eval_batches, prepare_corpus
from s2moe_ds.data import cache as cache_mod
from s2moe_ds.data.corpora import count_units, embedded_text
from s2moe_ds.data.tokenization import ByteTokenizer, CharTokenizer

TEXT = "".join(f"line {i}: the cat sat on the mat, and the dog ran after it.\n" for i in range(200))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def _cfg(tmp_path, **kw):
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("kw,field", [
    (dict(dataset="imagenet"), "data.dataset"),
    (dict(dataset="path"), "data.path"),
    (dict(dataset="path", path="/no/such/file.txt"), "data.path"),
    (dict(dataset="enwik8", path="/no/such/enwik8"), "data.path"),
    (dict(split=(0.5, 0.5)), "data.split"),
    (dict(split=(0.9, 0.1, 0.0)), "data.split"),
    (dict(split=(0.8, 0.1, 0.05)), "data.split"),
    (dict(tokenizer="wordpiece"), "data.tokenizer"),
    (dict(tokenizer="/no/such/tok.json"), "data.tokenizer"),
    (dict(path="x.txt"), "data.path"),  # embedded takes no path
    (dict(dataset="path", train_file="/no/train.txt", valid_file="/no/v", test_file="/no/t"), "data.train_file"),
    (dict(subword_vocab_size=100), "data.subword_vocab_size"),
])
def test_config_errors_name_the_field(tmp_path, kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ":"):
        _cfg(tmp_path, **kw)


def test_config_missing_split_file_and_defaults(tmp_path, text_file):
    with pytest.raises(ConfigError, match=r"data\.valid_file: is required"):
        _cfg(tmp_path, dataset="path", train_file=text_file)
    cfg = DataConfig(split=[0.8, 0.1, 0.1])
    assert cfg.split == (0.8, 0.1, 0.1) and cfg.cache_dir == os.path.expanduser("~/.cache/s2moe_ds")
    assert DataConfig(dataset="enwik8").tokenizer_kind == "byte"
    assert DataConfig(dataset="text8").tokenizer_kind == "char"
    assert DataConfig(dataset="wikitext-103").tokenizer_kind == "subword"


# ---------------------------------------------------------------- corpora

def test_embedded_corpus_without_network(tmp_path):
    text = embedded_text()
    assert 440_000 < len(text) < 490_000
    corpus = prepare_corpus(_cfg(tmp_path))
    assert corpus.unit == "char" and corpus.metric == "bpc"
    assert sum(corpus.units.values()) == len(text)
    assert corpus.units["train"] == pytest.approx(0.9 * len(text), abs=2)
    # The narrowest type the vocabulary allows: 104 characters fit a byte.
    assert isinstance(corpus.tokenizer, CharTokenizer) and corpus.splits["train"].dtype == np.uint8
    assert corpus.tokenizer.decode(corpus.splits["train"][:1000]) == text[:1000]


def test_local_file_split_sizes(tmp_path, text_file):
    corpus = prepare_corpus(_cfg(tmp_path, dataset="path", path=text_file))
    n = len(TEXT)
    assert corpus.units == {"train": round(0.9 * n), "valid": round(0.05 * n),
                            "test": n - round(0.9 * n) - round(0.05 * n)}
    assert {k: len(v) for k, v in corpus.splits.items()} == corpus.units  # one id per character
    joined = "".join(corpus.tokenizer.decode(corpus.splits[s]) for s in ("train", "valid", "test"))
    assert joined == TEXT
    assert corpus.identity["tokenizer"] == corpus.tokenizer.identity()


def test_local_folder_sorted_and_joined(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.txt").write_text("second file " * 50)
    (folder / "a.txt").write_text("first file " * 50)
    (folder / "ignored.md").write_text("not a txt")
    corpus = prepare_corpus(_cfg(tmp_path, dataset="path", path=str(folder)))
    whole = "".join(corpus.tokenizer.decode(corpus.splits[s]) for s in ("train", "valid", "test"))
    assert whole == "first file " * 50 + "\n" + "second file " * 50


def test_explicit_split_files(tmp_path):
    paths = {}
    for name, text in (("train", TEXT), ("valid", "the cat ran.\n" * 5), ("test", "a dog sat?\n" * 3)):
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text(text)
    corpus = prepare_corpus(_cfg(tmp_path, dataset="path", train_file=str(paths["train"]),
                                 valid_file=str(paths["valid"]), test_file=str(paths["test"])))
    assert corpus.units == {"train": len(TEXT), "valid": 13 * 5, "test": 11 * 3}
    assert corpus.tokenizer.decode(corpus.splits["valid"]) == "the cat ran.\n" * 5
    assert corpus.tokenizer.decode(corpus.splits["test"]) == "a dog sat\ufffd\n" * 3  # '?' unseen in train


def _wikitext_rows(n):
    rows = []
    for i in range(n):
        rows += ["", f" = Article {i} = \n", "", f" The article number {i} talks about cats and dogs . \n"]
    return rows


def _save_wikitext(tmp_path):
    from datasets import Dataset, DatasetDict
    folder = str(tmp_path / "wikitext_saved")
    DatasetDict({"train": Dataset.from_dict({"text": _wikitext_rows(60)}),
                 "validation": Dataset.from_dict({"text": _wikitext_rows(5)}),
                 "test": Dataset.from_dict({"text": _wikitext_rows(4)})}).save_to_disk(folder)
    return folder


def test_wikitext_from_saved_dataset(tmp_path):
    folder = _save_wikitext(tmp_path)
    corpus = prepare_corpus(_cfg(tmp_path, dataset="wikitext-103", path=folder, subword_vocab_size=300))
    assert corpus.unit == "word" and corpus.metric == "ppl" and corpus.tokenizer.kind == "subword"
    valid_text = "".join(_wikitext_rows(5))
    assert corpus.units["valid"] == len(valid_text.split())
    assert corpus.tokenizer.decode(corpus.splits["valid"]) == valid_text


def test_hub_path_is_the_same_code_and_fails_clearly(tmp_path, monkeypatch):
    import datasets
    folder = _save_wikitext(tmp_path)
    calls = []

    def from_cache(name, config=None, **kw):  # stands in for the hub cache: only the loader call differs
        calls.append((name, config))
        return datasets.load_from_disk(folder)

    monkeypatch.setattr(datasets, "load_dataset", from_cache)
    corpus = prepare_corpus(_cfg(tmp_path, dataset="wikitext-103", subword_vocab_size=300))
    assert calls == [("Salesforce/wikitext", "wikitext-103-raw-v1")]
    assert corpus.tokenizer.decode(corpus.splits["test"]) == "".join(_wikitext_rows(4))

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError) as err:
        prepare_corpus(_cfg(tmp_path, dataset="wikitext-103"))
    msg = str(err.value)
    assert msg.startswith("data.dataset:") and "could not be downloaded nor found in the" in msg
    assert "save_to_disk" in msg and "--path" in msg


@pytest.mark.parametrize("dataset", ["enwik8", "text8"])
def test_single_stream_saved_dataset_and_raw_file(tmp_path, dataset):
    from datasets import Dataset
    text = "anarchism originated as a term of abuse " * 300 if dataset == "text8" else "<page>wiki é</page>\n" * 500
    saved = str(tmp_path / f"{dataset}_saved")
    Dataset.from_dict({"text": [text]}).save_to_disk(saved)
    raw = tmp_path / dataset
    raw.write_bytes(text.encode("utf-8"))
    a = prepare_corpus(_cfg(tmp_path, dataset=dataset, path=saved))
    b = prepare_corpus(_cfg(tmp_path, dataset=dataset, path=str(raw)))
    unit = "byte" if dataset == "enwik8" else "char"
    assert a.unit == b.unit == unit and a.metric == "bpc"
    total = len(text.encode("utf-8")) if unit == "byte" else len(text)
    assert sum(a.units.values()) == total and a.units["train"] == round(0.9 * total)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(a.splits[split], b.splits[split])
    assert isinstance(a.tokenizer, ByteTokenizer) == (dataset == "enwik8")


def test_count_units():
    assert count_units("a  bc\n d", "word") == 3
    assert count_units("héllo", "char") == 5 and count_units("héllo", "byte") == 6
    long = ("word " * 300_000).strip()
    assert count_units(long, "word", chunk_size=1000) == 300_000


# ---------------------------------------------------------------- cache

def test_cache_is_reused_without_encoding(tmp_path, text_file, monkeypatch):
    cfg = _cfg(tmp_path, dataset="path", path=text_file)
    first = prepare_corpus(cfg)
    assert os.path.isfile(os.path.join(first.cache_path, cache_mod.COMPLETE))

    def no_encoding(*a, **kw):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(CharTokenizer, "encode", no_encoding)
    monkeypatch.setattr(cache_mod, "_encode_split", no_encoding)
    second = prepare_corpus(cfg)
    assert second.cache_path == first.cache_path and isinstance(second.splits["train"], np.memmap)
    assert second.tokenizer.identity() == first.tokenizer.identity()
    assert second.identity == first.identity


def test_cache_is_deterministic_and_keyed(tmp_path, text_file):
    a = prepare_corpus(_cfg(tmp_path, dataset="path", path=text_file))
    b = prepare_corpus(DataConfig(dataset="path", path=text_file, cache_dir=str(tmp_path / "other")))
    assert os.path.basename(a.cache_path) == os.path.basename(b.cache_path)
    for split in a.splits:
        np.testing.assert_array_equal(a.splits[split], b.splits[split])
    c = prepare_corpus(_cfg(tmp_path, dataset="path", path=text_file, tokenizer="byte"))
    assert c.cache_path != a.cache_path and c.tokenizer.vocab_size == 256
    with open(text_file, "a") as f:
        f.write("more text\n")
    d = prepare_corpus(_cfg(tmp_path, dataset="path", path=text_file))
    assert d.cache_path != a.cache_path  # the file changed: re-tokenized


def test_incomplete_cache_is_rebuilt(tmp_path, text_file):
    cfg = _cfg(tmp_path, dataset="path", path=text_file)
    first = prepare_corpus(cfg)
    os.remove(os.path.join(first.cache_path, cache_mod.COMPLETE))
    os.remove(os.path.join(first.cache_path, "valid.npy"))
    again = prepare_corpus(cfg)
    np.testing.assert_array_equal(again.splits["valid"], first.splits["valid"])


def test_tokenizer_file_is_used(tmp_path, text_file):
    tok_path = str(tmp_path / "tok.json")
    CharTokenizer("abcdefghijklmnopqrstuvwxyz ", built_from="alphabet").save(tok_path)
    corpus = prepare_corpus(_cfg(tmp_path, dataset="path", path=text_file, tokenizer=tok_path))
    assert corpus.tokenizer.vocab_size == 28 and corpus.unit == "char"


# ---------------------------------------------------------------- samplers

def test_sampler_resume_is_exact():
    tokens_N = np.arange(5000, dtype=np.uint16)
    n = 7
    straight = ContiguousBatchSampler(tokens_N, 16, 4, 0, 1, seed=3)
    ref = [straight.next_batch() for _ in range(2 * n + 90)]  # crosses several epochs
    first = ContiguousBatchSampler(tokens_N, 16, 4, 0, 1, seed=3)
    got = [first.next_batch() for _ in range(n)]
    state = first.state_dict()
    resumed = ContiguousBatchSampler(tokens_N, 16, 4, 0, 1, seed=3)
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(n + 90)]
    for (xa, ya), (xb, yb) in zip(ref, got):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, y = ref[0]
    assert x.dtype == torch.int64 and x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_sampler_ranks_are_disjoint_and_windows_contiguous():
    tokens_N = np.arange(3000, dtype=np.uint32)
    samplers = [ContiguousBatchSampler(tokens_N, 10, 3, r, 2, seed=0) for r in range(2)]
    per_epoch = samplers[0].batches_per_epoch
    seen = []
    for _ in range(per_epoch):
        starts = []
        for s in samplers:
            x, y = s.next_batch()
            assert torch.equal(y, x + 1)  # contiguous windows of arange
            starts += x[:, 0].tolist()
        assert len(set(starts)) == 6  # the 2 ranks' windows in one global batch are distinct
        seen += starts
    assert len(seen) == len(set(seen))  # and no window repeats within an epoch
    assert samplers[0].next_batch()[0].shape == (3, 10) and samplers[0].epoch == 1


def test_sampler_load_state_checks():
    tokens_N = np.arange(2000)
    a = ContiguousBatchSampler(tokens_N, 8, 4, 0, 2, seed=1)
    a.next_batch()
    b = ContiguousBatchSampler(tokens_N, 8, 8, 0, 1, seed=1)  # same global batch: continues exactly
    b.load_state_dict(a.state_dict())
    assert b.position == 1
    with pytest.raises(ConfigError, match=r"train\.seq_len"):
        ContiguousBatchSampler(tokens_N, 16, 4, 0, 2, seed=1).load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match=r"world size"):
        ContiguousBatchSampler(tokens_N, 8, 4, 0, 4, seed=1).load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match=r"train\.seq_len"):
        ContiguousBatchSampler(np.arange(20), 8, 4, 0, 2, seed=1)
    # A state written before the window offset existed still resumes.
    old = {k: v for k, v in a.state_dict().items() if k not in ("windows", "step_windows")}
    c = ContiguousBatchSampler(tokens_N, 8, 8, 0, 1, seed=1)
    c.load_state_dict(old)
    assert c.position == 1


def test_sampler_position_does_not_depend_on_the_world_size():
    """2 ranks x 4 windows x 1 accumulation step, resumed as 1 rank x 4 x 2 steps: every optimizer
    step reads the same windows, the epoch ends at the same step, and the position carries over."""
    tokens_N = np.arange(8 * 60 + 1)  # 60 windows of 8: 7 optimizer steps of 8 per epoch, 4 left over
    two = [ContiguousBatchSampler(tokens_N, 8, 4, r, 2, seed=5) for r in range(2)]
    one = ContiguousBatchSampler(tokens_N, 8, 4, 0, 1, seed=5, grad_accum=2)
    for s in two:
        s.next_batch()
    one.load_state_dict(two[0].state_dict())
    for step in range(1, 20):  # across the end of the epoch at step 7
        a = sorted(np.concatenate([s.next_batch()[0][:, 0].numpy() for s in two]).tolist())
        b = sorted(np.concatenate([one.next_batch()[0][:, 0].numpy() for _ in range(2)]).tolist())
        assert a == b, step
    assert one.epoch == two[0].epoch == 2
    with pytest.raises(ConfigError, match="gradient_accumulation_steps x world size"):
        ContiguousBatchSampler(tokens_N, 8, 4, 0, 1, seed=5).load_state_dict(two[0].state_dict())


@pytest.mark.parametrize("n,seq_len,batch,world", [(1001, 10, 3, 2), (1000, 10, 4, 3), (37, 8, 2, 1), (5, 8, 2, 3)])
def test_eval_batches_cover_every_target_once(n, seq_len, batch, world):
    tokens_N = np.arange(n, dtype=np.uint16)
    counts = np.zeros(n, dtype=np.int64)
    for rank in range(world):
        batches = list(eval_batches(tokens_N, seq_len, batch, rank, world))
        # Every rank brings the same shape to the collective forwards, padding included.
        assert batches and all(x.shape == (batch, seq_len) for x, _, _ in batches)
        again = list(eval_batches(tokens_N, seq_len, batch, rank, world))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(batches, again))
        for x, y, mask in batches:
            assert x.shape == y.shape == mask.shape
            m = mask.bool()
            assert torch.equal(y[m], x[m] + 1)
            counts[y[m].numpy()] += 1
    assert counts[0] == 0 and (counts[1:] == 1).all()


def test_offline_hub_failure_with_the_real_library(tmp_path):
    import subprocess
    import sys
    code = ("from s2moe_ds.data import DataConfig, prepare_corpus\n"
            "from s2moe_ds.config import ConfigError\n"
            "try:\n"
            f"    prepare_corpus(DataConfig(dataset='text8', cache_dir={str(tmp_path / 'c')!r}))\n"
            "except ConfigError as e:\n"
            "    print(e)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert out.stdout.startswith("data.dataset: 'text8'"), out.stdout + out.stderr
    assert "nor found in the Hugging Face cache" in out.stdout and "raw text8 file" in out.stdout


def test_files_that_are_not_utf8_text_or_not_files_are_named(tmp_path):
    """A latin-1 file (or a binary one) used to train silently on U+FFFD; a folder named *.txt
    inside --path, and --out-dir / --cache-dir naming a file, gave tracebacks."""
    from s2moe_ds.train import TrainConfig
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(("caf\u00e9 " * 2000).encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.txt is not UTF-8 text \(byte 0xe9 at offset 3, line 1\)"):
        prepare_corpus(_cfg(tmp_path, dataset="path", path=str(latin)))
    folder = tmp_path / "corpus"
    (folder / "notes.txt").mkdir(parents=True)
    (folder / "a.txt").write_text(TEXT)
    corpus = prepare_corpus(_cfg(tmp_path, dataset="path", path=str(folder)))
    assert sum(len(s) for s in corpus.splits.values()) > 0
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"data\.cache_dir: .*a_file is a file"):
        DataConfig(cache_dir=str(a_file))
    with pytest.raises(ConfigError, match=r"train\.out_dir: .*a_file is a file"):
        TrainConfig(out_dir=str(a_file))
