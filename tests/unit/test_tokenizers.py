"""Tokenizers: round trips, saved identity, the mismatch refusal, and the files under tokenizers/."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from s2moe_ds.config import ConfigError
from s2moe_ds.data.tokenization import (ByteTokenizer, CharTokenizer, SubwordTokenizer, check_tokenizer_matches,
                                        load_tokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZERS = os.path.join(ROOT, "tokenizers")

SMALL_TEXT = ("the quick brown fox jumps over the lazy dog.\n"
              "a stitch in time saves nine; the early bird catches the worm.\n"
              "  indented line\twith a tab, and émojis 🦊 too\n") * 30


def test_byte_round_trips_any_unicode():
    tok = ByteTokenizer()
    text = "héllo wörld — 日本語 🦊\x00\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and ids.max() < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 decodes with a replacement, never raises


def test_char_round_trip_and_unknown_maps_to_unk():
    tok = CharTokenizer.from_text("abc cab\n", built_from="test")
    assert tok.vocab_size == 6 and tok.chars == ["\n", " ", "a", "b", "c"]
    assert tok.decode(tok.encode("cab ba\n")) == "cab ba\n"
    ids = tok.encode("az")
    assert ids.tolist() == [2, tok.unk_id] and tok.unk_id == 5
    assert tok.decode(ids) == "a\ufffd"


def test_subword_trains_and_round_trips(tmp_path):
    tok = SubwordTokenizer.train([SMALL_TEXT], vocab_size=300, built_from="small text")
    assert 256 < tok.vocab_size <= 300
    for text in (SMALL_TEXT[:200], "unseen wörds ✓ and  spaces\n\n"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges learned
    again = SubwordTokenizer.train([SMALL_TEXT], vocab_size=300, built_from="small text")
    assert again.identity() == tok.identity()  # training is deterministic


@pytest.mark.parametrize("make", [
    ByteTokenizer,
    lambda: CharTokenizer.from_text("hello world", built_from="hello"),
    lambda: SubwordTokenizer.train([SMALL_TEXT], vocab_size=280, built_from="small"),
])
def test_save_load_keeps_identity(tmp_path, make):
    tok = make()
    path = str(tmp_path / "tok.json")
    tok.save(path)
    back = load_tokenizer(path)
    assert back.identity() == tok.identity()
    assert json.loads(json.dumps(tok.identity())) == tok.identity()
    assert set(tok.identity()) == {"kind", "vocab_size", "built_from", "sha256"}
    np.testing.assert_array_equal(back.encode("hello world"), tok.encode("hello world"))


def test_edited_file_is_refused(tmp_path):
    path = tmp_path / "tok.json"
    CharTokenizer.from_text("abc", built_from="x").save(str(path))
    obj = json.loads(path.read_text())
    obj["chars"] = ["a", "b", "d"]
    path.write_text(json.dumps(obj))
    with pytest.raises(ConfigError, match="data.tokenizer: .*edited"):
        load_tokenizer(str(path))


def test_mismatch_error_says_what_and_how_to_fix():
    expected = CharTokenizer.from_text("abc", built_from="corpus A").identity()
    same = CharTokenizer.from_text("cba", built_from="rebuilt").identity()
    check_tokenizer_matches(expected, same, where="runs/x/checkpoints")  # built_from does not matter
    with pytest.raises(ConfigError) as err:
        check_tokenizer_matches(expected, ByteTokenizer().identity(), where="runs/x/checkpoints")
    msg = str(err.value)
    assert msg.startswith("data.tokenizer:")
    assert "runs/x/checkpoints" in msg and "char tokenizer, vocab 4" in msg and "byte tokenizer, vocab 256" in msg
    assert "tokenizer.json" in msg


def test_repo_tokenizer_files():
    assert not os.path.exists(os.path.join(TOKENIZERS, "__init__.py"))  # would shadow the `tokenizers` library
    import tokenizers
    assert hasattr(tokenizers, "Tokenizer")
    assert load_tokenizer(os.path.join(TOKENIZERS, "byte.json")).identity() == ByteTokenizer().identity()
    text8 = load_tokenizer(os.path.join(TOKENIZERS, "text8_char.json"))
    assert text8.vocab_size == 28 and "".join(text8.chars) == " abcdefghijklmnopqrstuvwxyz"
    bpe_path = os.path.join(TOKENIZERS, "embedded_bpe.json")
    assert os.path.getsize(bpe_path) < 1_000_000
    bpe = load_tokenizer(bpe_path)
    assert bpe.kind == "subword" and bpe.vocab_size == 4096
    assert bpe.decode(bpe.encode("Return the value of x.\n")) == "Return the value of x.\n"


def test_train_subword_script(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text(SMALL_TEXT)
    out = tmp_path / "small_bpe.json"
    result = subprocess.run([sys.executable, os.path.join(TOKENIZERS, "train_subword.py"), "--input", str(corpus),
                             "--vocab-size", "300", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    tok = load_tokenizer(str(out))
    assert tok.kind == "subword" and tok.vocab_size <= 300
    bad = subprocess.run([sys.executable, os.path.join(TOKENIZERS, "train_subword.py"), "--input", "/no/such.txt",
                          "--vocab-size", "300", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "data.path" in bad.stderr
