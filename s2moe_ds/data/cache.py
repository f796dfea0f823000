"""Tokenize a corpus once, cache the token arrays on disk, and memory-map them on every later call."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from ..config import ConfigError
from ..fileio import atomic_write_text, temp_beside
from ..progress import counter
from .config import DataConfig, check_output_folder
from .corpora import SPLITS, CorpusSource, Text, count_units, locate
from .tokenization import (ByteTokenizer, CharTokenizer, SubwordTokenizer, Tokenizer, iter_chunks,
                           load_tokenizer)

# Bump when the cached layout or the tokenization of a kind changes: old caches are then ignored.
CACHE_FORMAT = 1
CHUNK_CHARS = 1 << 20
COMPLETE = "COMPLETE"


@dataclass
class PreparedCorpus:
    """Token arrays per split (memory-mapped, read-only), with what the metrics need."""

    tokenizer: Tokenizer
    splits: Dict[str, np.ndarray]
    """'train', 'valid', 'test': 1-D uint16 (vocab < 65536) or uint32 token ids."""
    units: Dict[str, int]
    """Per split: bytes, characters or words of the raw text (the metric's denominator)."""
    unit: str
    """'byte', 'char' or 'word'."""
    metric: str
    """'bpc' for byte and char units, 'ppl' (word-level perplexity) for words."""
    identity: Dict[str, object]
    """Dataset, split, corpus stamp and tokenizer identity: what a run record stores."""
    cache_path: str
    """The cache folder these arrays live in."""


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65536 else np.uint32


def _tokenizer_spec(cfg: DataConfig) -> Dict[str, object]:
    """What decides the tokenizer before it exists; a built tokenizer is a function of this and the corpus."""
    kind = cfg.tokenizer_kind
    if kind == "byte":
        return ByteTokenizer().identity()
    if kind == "file":
        return load_tokenizer(cfg.tokenizer).identity()
    if kind == "char":
        return {"kind": "char", "built_from": "train split"}
    return {"kind": "subword", "built_from": "train split", "vocab_size": cfg.subword_vocab_size}


def _build_tokenizer(cfg: DataConfig, train_text: Text, corpus_key: str, name: str) -> Tokenizer:
    kind = cfg.tokenizer_kind
    if kind == "byte":
        return ByteTokenizer()
    if kind == "file":
        return load_tokenizer(cfg.tokenizer)
    if isinstance(train_text, bytes):
        train_text = train_text.decode("utf-8", errors="replace")
    built_from = f"{name} train split (corpus {corpus_key[:16]})"
    if kind == "char":
        return CharTokenizer.from_text(train_text, built_from=built_from)
    return SubwordTokenizer.train(iter_chunks(train_text, CHUNK_CHARS, at_newline=True), cfg.subword_vocab_size,
                                  built_from=built_from)


def _encode_to_npy(tokenizer: Tokenizer, text: Text, path: str, desc: str) -> int:
    """Encode in chunks (bounded memory, progress on large splits) straight into a .npy file,
    written through a new file of ours beside `path` (an unpredictable name, so a link planted
    in the cache folder is never written through) and renamed over it."""
    dtype = np.dtype(_token_dtype(tokenizer.vocab_size))
    if tokenizer.kind == "byte" and isinstance(text, str):
        text = text.encode("utf-8")
    elif tokenizer.kind != "byte" and isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    # A bar on a terminal for large splits only; in a log, a line per tenth and one when done.
    bar = counter(len(text), desc, "B" if isinstance(text, bytes) else "char", quiet_below=8 * CHUNK_CHARS)
    with temp_beside(path) as (f, tmp):
        if tokenizer.kind in ("byte", "char"):
            n = _encode_one_per_unit(tokenizer, text, f, dtype, bar)
        else:
            n = _encode_batched(tokenizer, text, f, dtype, bar)
        bar.close()
        os.replace(tmp, path)
    return n


def _encode_one_per_unit(tokenizer: Tokenizer, text: Text, f, dtype: np.dtype, bar) -> int:
    """One id per byte / per character: the length is known, so the ids go into a memory map of
    `f` behind the header open_memmap would write."""
    n = len(text)
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                             "fortran_order": False, "shape": (n,)})
    f.flush()
    out_N = np.memmap(f, dtype=dtype, mode="r+", offset=f.tell(), shape=(n,))
    pos = 0
    for chunk in iter_chunks(text, CHUNK_CHARS):
        ids = tokenizer.encode(chunk)
        out_N[pos:pos + len(ids)] = ids
        pos += len(ids)
        bar.update(len(chunk))
    assert pos == n, (pos, n)
    out_N.flush()
    del out_N
    return n


def _encode_batched(tokenizer: Tokenizer, text: Text, f, dtype: np.dtype, bar) -> int:
    pieces: List[np.ndarray] = []
    chunks = list(iter_chunks(text, CHUNK_CHARS, at_newline=True))
    for start in range(0, len(chunks), 16):
        batch = chunks[start:start + 16]
        pieces.extend(ids.astype(dtype) for ids in tokenizer.encode_batch(batch))
        bar.update(sum(len(c) for c in batch))
    tokens_N = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    np.save(f, tokens_N)
    return len(tokens_N)


def _write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def _open(folder: str) -> PreparedCorpus:
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer.json"))
    splits = {s: np.load(os.path.join(folder, f"{s}.npy"), mmap_mode="r") for s in SPLITS}
    return PreparedCorpus(tokenizer=tokenizer, splits=splits, units=meta["units"], unit=meta["unit"],
                          metric=meta["metric"], identity=meta["identity"], cache_path=folder)


def cache_folder(cfg: DataConfig, source: CorpusSource) -> str:
    key = _sha256({"format": CACHE_FORMAT, "corpus": source.identity, "tokenizer": _tokenizer_spec(cfg)})
    return os.path.join(cfg.cache_dir, f"{source.name}-{key[:20]}")


def prepare_corpus(cfg: DataConfig) -> PreparedCorpus:
    """Tokenized train/valid/test splits of `cfg`'s corpus, from the cache when it holds them.

    The cache folder is keyed by a sha256 of the corpus identity (file sizes and mtimes, a content
    hash, or a dataset fingerprint), the split, the tokenizer (or how it is built) and CACHE_FORMAT.
    Every file is written to a temporary name and renamed; COMPLETE is written last, and only a
    folder with COMPLETE is read. A character or subword tokenizer is built from the training split
    and saved in the folder, so every later call (and every rank) uses the very same one.

    Several ranks: call it on rank 0 first, barrier, then on the other ranks, which then only read
    the cache. Should two processes ever fill the same folder at once (e.g. a node-local cache), both
    write the same deterministic bytes through atomic renames, so either result is whole.
    """
    source = locate(cfg)
    folder = cache_folder(cfg, source)
    if os.path.isfile(os.path.join(folder, COMPLETE)):
        return _open(folder)
    # A cache that must be filled: a read-only or foreign --cache-dir is named before the corpus is read.
    check_output_folder(cfg.cache_dir, "data.cache_dir", "--cache-dir")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data.cache_dir: cannot create {folder} ({e.strerror or e}); pass --cache-dir a folder "
                          "you can write to") from None
    texts = source.read()
    corpus_key = _sha256(source.identity)
    tokenizer = _build_tokenizer(cfg, texts["train"], corpus_key, source.name)
    lengths, units = {}, {}
    for split in SPLITS:
        units[split] = count_units(texts[split], source.unit)
        lengths[split] = _encode_to_npy(tokenizer, texts[split], os.path.join(folder, f"{split}.npy"),
                                        f"tokenizing {source.name}/{split}")
        if lengths[split] < 2:
            raise ConfigError(f"data.split: the {split} split of {source.name} has {lengths[split]} tokens; every "
                              "split needs at least 2 (one input, one target): use a larger corpus or other fractions")
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    metric = "ppl" if source.unit == "word" else "bpc"
    identity = {"dataset": cfg.dataset, "path": cfg.path,
                "files": [cfg.train_file, cfg.valid_file, cfg.test_file] if cfg.train_file else None,
                "split": list(cfg.split), "unit": source.unit, "corpus": source.identity,
                "tokenizer": tokenizer.identity(), "tokens": lengths, "cache_key": os.path.basename(folder)}
    _write_json(os.path.join(folder, "meta.json"), {"format": CACHE_FORMAT, "units": units, "unit": source.unit,
                                                    "metric": metric, "identity": identity})
    _write_json(os.path.join(folder, COMPLETE), {"format": CACHE_FORMAT})
    return _open(folder)
