"""Data preparation in bounded memory (issue 26 items 1 and 2): the streamed cache gives the ids
the whole-text code gave, whatever the chunk and block sizes; characters beyond U+FFFF; One
Billion Word on a stand-in of its shard layout; which ranks fill the cache."""

import hashlib
import os

import numpy as np
import pytest

from s2moe_ds.config import ConfigError
from s2moe_ds.data import DataConfig, prepare_corpus
from s2moe_ds.data import cache as cache_mod
from s2moe_ds.data import corpora
from s2moe_ds.data.cache import preparing_ranks, token_dtype
from s2moe_ds.data.corpora import embedded_text
from s2moe_ds.data.tokenization import CharTokenizer, SubwordTokenizer, WordTokenizer, word_chunks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN_CORPUS = os.path.join(ROOT, "tests", "data", "golden_corpus.txt")
EMBEDDED_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"  # CPython 3.11's pydoc topics

# sha256 (first 16 hex digits) of each split's ids as int64, and of the tokenizer, as the code
# before streaming (commit f0fadcd: the whole text read, split and encoded in memory) made them.
BEFORE = {
    "embedded-char": (dict(dataset="embedded"), 104, "d27c7ce10a8b82ed",
                      ("c60427ba8ac276ab", "9f704a6991a79f57", "acd6075ef89aac4b")),
    "embedded-byte": (dict(dataset="embedded", tokenizer="byte"), 256, "b2330f2994e5ca3d",
                      ("a020635e1e6847ae", "ff8f500c7bd66a1f", "18e9a6824722bb97")),
    "embedded-subword": (dict(dataset="embedded", tokenizer="subword", subword_vocab_size=512), 512,
                         "7a5d0436cf52dc10", ("f19806ec0f8e46be", "37b4480af31baabd", "a6b2dd5152241bc5")),
    "embedded-bpe-file": (dict(dataset="embedded", tokenizer=os.path.join(ROOT, "tokenizers", "embedded_bpe.json")),
                          4096, "b5b841023d44c2f1", ("b2650711ff0e7839", "bd4c4644485ec1f6", "77ed31c56c247971")),
    "golden-char": (dict(dataset="path", path=GOLDEN_CORPUS), 97, "7dd3d9ccc76ac327",
                    ("0caeb0b3e481b8d4", "e7543376095258cd", "4673145e854d27b6")),
    "golden-subword": (dict(dataset="path", path=GOLDEN_CORPUS, tokenizer="subword", subword_vocab_size=300), 300,
                       "3869f62528712501", ("c369592ff87f4a8f", "70129067ecaa0e40", "b42968197db8a3e2")),
}


def _digest(ids) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_committed_corpora_give_the_ids_they_gave_before_streaming(tmp_path, name):
    kw, vocab, tokenizer_sha, split_shas = BEFORE[name]
    if kw["dataset"] == "embedded" and hashlib.sha256(embedded_text().encode()).hexdigest() != EMBEDDED_SHA256:
        pytest.skip("this CPython's pydoc topics are another text than the recorded ids were made from")
    corpus = prepare_corpus(DataConfig(cache_dir=str(tmp_path), **kw))
    assert corpus.tokenizer.vocab_size == vocab
    assert corpus.tokenizer.identity()["sha256"][:16] == tokenizer_sha
    assert tuple(_digest(corpus.splits[s]) for s in ("train", "valid", "test")) == split_shas
    assert corpus.splits["train"].dtype == token_dtype(vocab)


def test_token_dtype_is_the_narrowest():
    assert [token_dtype(v) for v in (28, 256, 257, 65536, 65537, 793_472)] == \
        [np.uint8, np.uint8, np.uint16, np.uint16, np.uint32, np.uint32]


# A text that trips chunked tokenizers: indented lines (a whitespace run after a newline), runs
# of spaces and blank lines, tabs, CRLF, characters beyond U+FFFF, a long word, no final newline.
TRICKY = "".join(
    f"Line {i}:  the  cat\tsat.\n    indented {i} \U0001F600 and \U00010348x\r\n\n\n  {'w' * (i % 7) * 40}  end\n"
    for i in range(300)) + "last words \U0001F4A9"


def _split_texts(text, fractions=(0.9, 0.05, 0.05)):
    n = len(text)
    a, b = int(round(n * fractions[0])), int(round(n * fractions[1]))
    return {"train": text[:a], "valid": text[a:a + b], "test": text[a + b:]}


@pytest.fixture
def small_chunks(monkeypatch):
    """Reads of 1000 bytes (a 4-byte character is cut between reads) and chunks of a few dozen
    characters: hundreds of boundaries in a small corpus."""
    monkeypatch.setattr(corpora, "_READ_CHUNK", 1000)
    monkeypatch.setattr(cache_mod, "CHUNK_CHARS", 97)
    monkeypatch.setattr(cache_mod, "TRAIN_CHUNK_CHARS", 53)
    monkeypatch.setattr(cache_mod, "ENCODE_CHUNK_CHARS", 41)
    monkeypatch.setattr(cache_mod, "_SMALL_SPLIT", 0)


@pytest.mark.parametrize("tokenizer", ["char", "byte", "subword", "word"])
def test_chunk_boundaries_do_not_change_ids(tmp_path, small_chunks, tokenizer):
    """Small reads and chunks, worker processes: the ids of each split are those of the split's
    whole text encoded at once by a tokenizer built from the whole training text."""
    path = tmp_path / "tricky.txt"
    path.write_text(TRICKY, encoding="utf-8")
    cfg = DataConfig(dataset="path", path=str(path), tokenizer=tokenizer, subword_vocab_size=400,
                     word_min_count=2, tokenize_workers=2, cache_dir=str(tmp_path / "cache"))
    corpus = prepare_corpus(cfg)
    texts = _split_texts(TRICKY)
    whole = {"char": lambda: CharTokenizer.from_text(texts["train"], built_from=""),
             "byte": lambda: corpus.tokenizer,
             "subword": lambda: SubwordTokenizer.train([texts["train"]], 400, built_from=""),
             "word": lambda: WordTokenizer.from_counts(_counts(texts["train"]), 2, built_from="")}[tokenizer]()
    assert whole.identity()["sha256"] == corpus.tokenizer.identity()["sha256"]
    for split, text in texts.items():
        np.testing.assert_array_equal(np.asarray(corpus.splits[split]), whole.encode(text), err_msg=split)


def _counts(text):
    from collections import Counter
    return Counter(text.split())


def test_word_chunks_cut_no_word_and_keep_the_text():
    text = TRICKY * 3
    for size in (5, 64, 1000):
        chunks = list(word_chunks(iter([text[i:i + 333] for i in range(0, len(text), 333)]), size))
        assert "".join(chunks) == text
        for a, b in zip(chunks, chunks[1:]):
            assert b[0] in " \n" and not a[-1].isspace(), (size, a[-5:], b[:5])
        lines = list(word_chunks(iter([text]), size, lines=True))
        assert "".join(lines) == text and all(c.endswith("\n") for c in lines[:-1])
    # No whitespace at all: cut after `longest` x size characters, never waiting for ever.
    assert [len(c) for c in word_chunks(iter(["x" * 1000]), 10, longest=4)] == [40] * 25


def test_characters_beyond_the_bmp(tmp_path, small_chunks):
    """One id per character whatever its width; the vocabulary holds the emoji; units are characters."""
    text = "".join(f"plain line {i}\n" if i % 5 else f"emoji \U0001F600\U0001F680 line {i}\n" for i in range(400))
    path = tmp_path / "emoji.txt"
    path.write_text(text, encoding="utf-8")
    corpus = prepare_corpus(DataConfig(dataset="path", path=str(path), cache_dir=str(tmp_path / "c")))
    assert "\U0001F600" in corpus.tokenizer.chars and sum(corpus.units.values()) == len(text)
    assert corpus.splits["train"].dtype == np.uint8
    assert corpus.tokenizer.decode(corpus.splits["train"]) == _split_texts(text)["train"]


def test_not_utf8_is_named_with_its_offset_across_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "_READ_CHUNK", 7)
    path = tmp_path / "mixed.txt"
    good = "ab\n\U0001F600cd\n" * 5  # 10 bytes a line, a 4-byte character cut between reads
    path.write_bytes(good.encode("utf-8") + b"caf\xe9\n")
    with pytest.raises(ConfigError, match=r"mixed\.txt is not UTF-8 text \(byte 0xe9 at offset 53, line 11\)"):
        prepare_corpus(DataConfig(dataset="path", path=str(path), cache_dir=str(tmp_path / "c")))


# ---------------------------------------------------------------- One Billion Word

TRAIN_DIR, HELDOUT_DIR = "training-monolingual.tokenized.shuffled", "heldout-monolingual.tokenized.shuffled"


def _one_billion_word(root, shards=2):
    """A stand-in of the benchmark's layout: a few training shards, two heldout shards, one
    sentence per line, tokens separated by spaces, files without a suffix."""
    train, heldout = root / TRAIN_DIR, root / HELDOUT_DIR
    train.mkdir(parents=True)
    heldout.mkdir(parents=True)
    for s in range(1, shards + 1):
        (train / f"news.en-{s:05d}-of-00100").write_text(
            "".join(f"The cat sat on mat {i % 4} , shard {s} .\n" for i in range(50)) + f"rare{s} word .\n")
    (heldout / "news.en.heldout-00000-of-00050").write_text("The dog sat on mat 1 .\nA cat ran .\n")
    (heldout / "news.en.heldout-00001-of-00050").write_text("Not used .\n")
    return root


def test_one_billion_word_from_its_shard_layout(tmp_path):
    root = _one_billion_word(tmp_path / "1-billion-word-language-modeling-benchmark-r13output")
    cfg = DataConfig(dataset="one-billion-word", path=str(root), cache_dir=str(tmp_path / "c"))
    assert cfg.tokenizer_kind == "word"
    corpus = prepare_corpus(cfg)
    tok = corpus.tokenizer
    assert isinstance(tok, WordTokenizer) and tok.token_strings()[:3] == ["<S>", "</S>", "<unk>"]
    # Words seen >= 3 times in the training shards, by falling count; 'rare1', 'dog', 'A' are not.
    assert tok.words[:4] == [".", ",", "The", "cat"] and "rare1" not in tok.words and "dog" not in tok.words
    assert set(tok.words) == {".", "The", "cat", "sat", "on", "mat", "0", "1", "2", "3", ",", "shard"}
    assert corpus.unit == "word" and corpus.metric == "ppl" and corpus.splits["train"].dtype == np.uint8
    # valid and test: heldout shard 00000, each line <S> words </S>.
    test = [tok.token_strings()[i] for i in corpus.splits["test"]]
    assert test == ["<S>", "The", "<unk>", "sat", "on", "mat", "1", ".", "</S>", "<S>", "<unk>", "cat", "<unk>",
                    ".", "</S>"]
    np.testing.assert_array_equal(corpus.splits["valid"], corpus.splits["test"])
    assert corpus.units["test"] == 7 + 1 + 4 + 1  # words and each sentence's </S>, not <S>
    assert len(corpus.splits["train"]) == 2 * (50 * 12 + 5)
    assert tok.decode(corpus.splits["test"]) == "The <unk> sat on mat 1 .\n<unk> cat <unk> .\n"


def test_one_billion_word_as_the_hub_has_it(tmp_path):
    """The hub copy (billion-word-benchmark/lm1b) has train and test only, a sentence per row:
    valid is the test set, as with the shard folder; a save_to_disk copy reads the same way."""
    import datasets
    rows = {"train": [f"the cat sat {i % 3} ." for i in range(30)], "test": ["the dog sat 1 .", "a cat ."]}
    saved = str(tmp_path / "lm1b")
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in rows.items()}).save_to_disk(saved)
    corpus = prepare_corpus(DataConfig(dataset="one-billion-word", path=saved, cache_dir=str(tmp_path / "c")))
    names = corpus.tokenizer.token_strings()
    assert [names[i] for i in corpus.splits["valid"]] == [names[i] for i in corpus.splits["test"]] == \
        ["<S>", "the", "<unk>", "sat", "1", ".", "</S>", "<S>", "<unk>", "cat", ".", "</S>"]
    assert len(corpus.splits["train"]) == 30 * 7


def test_one_billion_word_preset():
    from s2moe_ds.train.presets import preset
    exp = preset("txl-lm1b")
    assert exp.data.dataset == "one-billion-word" and exp.data.tokenizer_kind == "word"
    assert exp.model.backbone == "txl" and exp.train.seq_len == 512 and exp.train.lr == 3.5e-4


@pytest.mark.parametrize("damage,message", [
    ("no_train_dir", r"has no folder training-monolingual\.tokenized\.shuffled/ .*not found.*pass --path the folder "
                     r"unpacked from 1-billion-word-language-modeling-benchmark-r13output\.tar\.gz"),
    ("empty_train_dir", r"training-monolingual\.tokenized\.shuffled holds no training shard "
                        r"\(news\.en-NNNNN-of-00100\); pass --path"),
    ("no_test_shard", r"news\.en\.heldout-00000-of-00050 not found: heldout shard 00000 is the benchmark's test set"),
    ("a_file", r"is a file; one-billion-word needs a folder saved with datasets' save_to_disk, or the benchmark's "
               r"unpacked folder"),
])
def test_one_billion_word_bad_folders_are_named(tmp_path, damage, message):
    root = _one_billion_word(tmp_path / "obw")
    if damage == "no_train_dir":
        for f in (root / TRAIN_DIR).iterdir():
            f.unlink()
        (root / TRAIN_DIR).rmdir()
    elif damage == "empty_train_dir":
        for f in (root / TRAIN_DIR).iterdir():
            f.unlink()
    elif damage == "no_test_shard":
        (root / HELDOUT_DIR / "news.en.heldout-00000-of-00050").unlink()
    elif damage == "a_file":
        root = root / TRAIN_DIR / "news.en-00001-of-00100"
    with pytest.raises(ConfigError, match="data.path: .*" + message):
        DataConfig(dataset="one-billion-word", path=str(root), cache_dir=str(tmp_path / "c"))


def test_unknown_corpus_and_shards_as_path_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.dataset: must be one of .*'one-billion-word'.*got 'lm1b'"):
        DataConfig(dataset="lm1b")
    root = _one_billion_word(tmp_path / "obw")
    with pytest.raises(ConfigError, match=r"holds no \*\.txt files.*--dataset one-billion-word"):
        DataConfig(dataset="path", path=str(root))


def test_word_tokenizer_round_trip_and_file(tmp_path):
    from s2moe_ds.data.tokenization import load_tokenizer
    tok = WordTokenizer.from_counts({"a": 5, "b": 5, "c": 1, "<S>": 9}, 2, built_from="t")
    assert tok.words == ["a", "b"] and tok.vocab_size == 5
    ids = tok.encode("a b c\n\n  b a\n")
    assert ids.tolist() == [0, 3, 4, 2, 1, 0, 4, 3, 1]
    assert tok.decode(ids) == "a b <unk>\nb a\n"
    tok.save(str(tmp_path / "w.json"))
    assert load_tokenizer(str(tmp_path / "w.json")).identity() == tok.identity()


# ---------------------------------------------------------------- which ranks fill the cache

def test_preparing_ranks_shared_and_node_local():
    hosts = ["a", "a", "b", "b"]
    # Every rank sees rank 0's marker: one shared folder, global rank 0 fills it.
    assert preparing_ranks([True] * 4, hosts) == [0, 0, 0, 0]
    # Only node a sees it: node-local folders, each node's first rank fills its own.
    assert preparing_ranks([True, True, False, False], hosts) == [0, 0, 2, 2]
    # Ranks placed round-robin over the nodes.
    assert preparing_ranks([True, False, True, False], ["a", "b", "a", "b"]) == [0, 1, 0, 1]
