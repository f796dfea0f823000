"""Tokenize a corpus once, cache the token arrays on disk, and memory-map them on every later call.

The corpus is streamed: read in blocks, tokenized chunk by chunk (a subword or word tokenizer in
worker processes) and written straight into the .npy files, so the memory of the process that
fills the cache does not grow with the corpus. `prepare_on_ranks` decides which ranks fill it.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from ..config import ConfigError
from ..fileio import atomic_write_text, temp_beside
from ..progress import counter
from .config import DataConfig, check_output_folder
from .corpora import SPLITS, CorpusSource, Text, UnitCounter, locate
from .tokenization import (ByteTokenizer, CharTokenizer, SubwordTokenizer, Tokenizer, WordTokenizer, code_points,
                           encode_parallel, load_tokenizer, word_chunks)

# Bump when the cached layout or the tokenization of a kind changes: old caches are then ignored.
# 2: ids in the narrowest integer type (uint8 up to 256 symbols); a subword split's ids are those
# of the whole split, whatever the chunks it is encoded in (format 1 cut chunks after the last
# newline of each MiB, which could move the ids of a line that starts with spaces).
CACHE_FORMAT = 2
CHUNK_CHARS = 1 << 20
"""Pieces a character tokenizer encodes at once, and chunks of word counting."""
TRAIN_CHUNK_CHARS = 1 << 16
"""Chunks of the training split that a subword tokenizer is trained on: the tokenizers library
buffers 256 of them, so 1 MiB chunks would hold 256 MiB (the merges do not depend on the size)."""
ENCODE_CHUNK_CHARS = 1 << 16
"""Chunks that a subword or word tokenizer encodes, one per task of a worker process (64 KiB
chunks encode 2.3x faster than 1 MiB ones)."""
COMPLETE = "COMPLETE"
_SMALL_SPLIT = 8 * ENCODE_CHUNK_CHARS  # below this, worker processes cost more than they save


@dataclass
class PreparedCorpus:
    """Token arrays per split (memory-mapped, read-only), with what the metrics need."""

    tokenizer: Tokenizer
    splits: Dict[str, np.ndarray]
    """'train', 'valid', 'test': 1-D token ids, uint8 (vocab <= 256), uint16 (<= 65536) or uint32."""
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


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds ids 0 .. vocab_size - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _tokenizer_spec(cfg: DataConfig) -> Dict[str, object]:
    """What decides the tokenizer before it exists; a built tokenizer is a function of this and the corpus."""
    kind = cfg.tokenizer_kind
    if kind == "byte":
        return ByteTokenizer().identity()
    if kind == "file":
        return load_tokenizer(cfg.tokenizer).identity()
    if kind == "char":
        return {"kind": "char", "built_from": "train split"}
    if kind == "word":
        return {"kind": "word", "built_from": "train split", "min_count": cfg.word_min_count}
    return {"kind": "subword", "built_from": "train split", "vocab_size": cfg.subword_vocab_size}


def _workers(cfg: DataConfig) -> int:
    if cfg.tokenize_workers:
        return cfg.tokenize_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _log(message: str) -> None:
    print(message, file=sys.stdout, flush=True)


def _as_text(pieces: Iterable[Text]) -> Iterator[str]:
    """Text pieces; bytes (a byte-unit corpus given a text tokenizer) decoded as one UTF-8 stream,
    with U+FFFD for what is not UTF-8, as decoding the split whole would."""
    decoder = None
    for piece in pieces:
        if isinstance(piece, str):
            yield piece
            continue
        decoder = decoder or codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = decoder.decode(piece)
        if text:
            yield text
    if decoder is not None:
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail


def _with_progress(pieces: Iterable[Text], desc: str, total: Optional[int], unit: str) -> Iterator[Text]:
    bar = counter(total or 0, desc, unit, quiet_below=8 * CHUNK_CHARS)
    for piece in pieces:
        bar.update(len(piece))
        yield piece
    bar.close()


def _char_alphabet(pieces: Iterable[str]) -> List[str]:
    """The distinct characters of the text, as set(text) would give, without holding the text."""
    seen = np.zeros(0x110000, dtype=bool)
    for piece in pieces:
        points = code_points(piece)
        if points.dtype == np.uint8:
            seen[:256] |= np.bincount(points, minlength=256) > 0  # a count beats 10^6 scattered writes
        else:
            seen[points] = True
    return [chr(c) for c in np.flatnonzero(seen)]


def _word_counts(pieces: Iterable[str]) -> Counter:
    counts: Counter = Counter()
    for chunk in word_chunks(pieces, CHUNK_CHARS, lines=True):
        counts.update(chunk.split())
    return counts


def _build_tokenizer(cfg: DataConfig, source: CorpusSource, corpus_key: str) -> Tokenizer:
    """The tokenizer of `cfg`; one built from the corpus reads the training split once, streamed."""
    kind = cfg.tokenizer_kind
    if kind == "byte":
        return ByteTokenizer()
    if kind == "file":
        return load_tokenizer(cfg.tokenizer)
    built_from = f"{source.name} train split (corpus {corpus_key[:16]})"
    what = {"char": "alphabet", "word": "word counts", "subword": "BPE merges"}[kind]
    train = _as_text(_with_progress(source.stream("train"), f"{what} of {source.name}/train",
                                    source.size("train"), "B" if source.unit == "byte" else "char"))
    if kind == "char":
        return CharTokenizer(_char_alphabet(train), built_from=built_from)
    if kind == "word":
        return WordTokenizer.from_counts(_word_counts(train), cfg.word_min_count, built_from=built_from)
    return SubwordTokenizer.train(word_chunks(train, TRAIN_CHUNK_CHARS), cfg.subword_vocab_size,
                                  built_from=built_from)


def _ids(tokenizer: Tokenizer, pieces: Iterable[Text], workers: int, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The token ids of the text of `pieces`, piece by piece: one per byte or character wherever
    a piece ends; a subword or word tokenizer on chunks that cut no word (or line), so the ids are
    those of the whole text."""
    if tokenizer.kind == "byte":
        for piece in pieces:
            yield np.frombuffer(piece.encode("utf-8") if isinstance(piece, str) else piece, dtype=np.uint8)
        return
    text = _as_text(pieces)
    if tokenizer.kind == "char":
        encode = tokenizer.encoder(dtype)
        for piece in text:
            for start in range(0, len(piece), CHUNK_CHARS):
                yield encode(piece[start:start + CHUNK_CHARS])
        return
    yield from encode_parallel(tokenizer, word_chunks(text, ENCODE_CHUNK_CHARS, lines=tokenizer.kind == "word"),
                               workers, dtype)


class _NpyWriter:
    """A 1-D .npy file written in appended pieces: the header reserves room for any length and is
    rewritten with the final one at the end, so nothing needs the length (or the ids) up front."""

    _HEADER_BYTES = 128

    def __init__(self, f, dtype: np.dtype) -> None:
        self.f, self.dtype, self.n = f, dtype, 0
        f.write(self._header(0))

    def _header(self, n: int) -> bytes:
        text = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)})
        body = self._HEADER_BYTES - 10  # magic (6), version (2), header length (2)
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", body) + (text.ljust(body - 1) + "\n").encode("latin1")

    def write(self, ids: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.n += len(ids)

    def finish(self) -> int:
        self.f.flush()
        self.f.seek(0)
        self.f.write(self._header(self.n))
        self.f.flush()
        return self.n


def _encode_split(tokenizer: Tokenizer, source: CorpusSource, split: str, path: str,
                  workers: int) -> Tuple[int, int]:
    """(tokens, metric units) of one split, its ids written straight into `path` through a new
    file of ours beside it (an unpredictable name, so a link planted in the cache folder is never
    written through) renamed over it."""
    dtype = token_dtype(tokenizer.vocab_size)
    units = UnitCounter(source.unit)
    sentences = 0

    def counted(pieces):
        for piece in pieces:
            units.add(piece)
            yield piece
    raw = _with_progress(source.stream(split), f"tokenizing {source.name}/{split}", source.size(split),
                         "B" if source.unit == "byte" else "char")
    small = (source.size(split) or 0) < _SMALL_SPLIT
    with temp_beside(path) as (f, tmp):
        writer = _NpyWriter(f, dtype)
        for ids in _ids(tokenizer, counted(raw), 1 if small else workers, dtype):
            writer.write(ids)
            if tokenizer.kind == "word":
                sentences += int(np.count_nonzero(ids == WordTokenizer.bos_id))
        n = writer.finish()
        os.replace(tmp, path)
    # A word tokenizer's perplexity counts every word and each sentence's </S>, not its <S> (the
    # given context): One Billion Word's convention.
    return n, (n - sentences if tokenizer.kind == "word" else units.total)


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


def prepare_corpus(cfg: DataConfig, on_folder=None) -> PreparedCorpus:
    """Tokenized train/valid/test splits of `cfg`'s corpus, from the cache when it holds them.

    The cache folder is keyed by a sha256 of the corpus identity (file sizes and mtimes, a content
    hash, or a dataset fingerprint), the split, the tokenizer (or how it is built) and CACHE_FORMAT.
    Every file is written to a temporary name and renamed; COMPLETE is written last, and only a
    folder with COMPLETE is read. A character, word or subword tokenizer is built from the training
    split and saved in the folder, so every later call (and every rank) uses the very same one.
    Nothing is held whole: memory stays bounded whatever the corpus size. `on_folder(folder)` is
    called once the folder is known (prepare_on_ranks names it to the ranks that wait).

    Several ranks: prepare_on_ranks. Should two processes ever fill the same folder at once, both
    write the same deterministic bytes through atomic renames, so either result is whole.
    """
    source = locate(cfg)
    folder = cache_folder(cfg, source)
    if on_folder is not None:
        on_folder(folder)
    if os.path.isfile(os.path.join(folder, COMPLETE)):
        return _open(folder)
    # A cache that must be filled: a read-only or foreign --cache-dir is named before the corpus is read.
    check_output_folder(cfg.cache_dir, "data.cache_dir", "--cache-dir")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data.cache_dir: cannot create {folder} ({e.strerror or e}); pass --cache-dir a folder "
                          "you can write to") from None
    start = time.perf_counter()
    tokenizer = _build_tokenizer(cfg, source, _sha256(source.identity))
    lengths, units = {}, {}
    for split in SPLITS:
        lengths[split], units[split] = _encode_split(tokenizer, source, split, os.path.join(folder, f"{split}.npy"),
                                                     _workers(cfg))
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
    if sum(lengths.values()) > 8 * CHUNK_CHARS:
        _log(f"prepared {folder}: {sum(lengths.values()):,} tokens in {time.perf_counter() - start:.0f} s")
    return _open(folder)


# -- which ranks fill the cache -----------------------------------------------------------------

PROBE_PREFIX = ".s2moe_ds-probe-"


def preparing_ranks(seen_by: List[bool], hosts: List[str]) -> List[int]:
    """For each rank, the rank that fills its cache: global rank 0 for every rank that sees rank
    0's marker file in --cache-dir (a shared folder); else the first rank of its host that does
    not see it (a node-local folder: one preparer per node)."""
    out = []
    for rank, (seen, host) in enumerate(zip(seen_by, hosts)):
        out.append(0 if seen else min(r for r in range(len(hosts)) if hosts[r] == host and not seen_by[r]))
    return out


def _probe_shared(cache_dir: str) -> List[int]:
    """Collective: which rank fills each rank's cache. Global rank 0 creates a marker file of a
    new random name in the cache folder; after that every rank looks for it (a name no node has
    looked up before, so a network file system asks its server), and the ranks share what they
    saw and their host names. Rank 0 then removes its marker."""
    import torch.distributed as dist
    token = [None]
    if dist.get_rank() == 0:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            name = os.path.join(cache_dir, PROBE_PREFIX + uuid.uuid4().hex)
            with open(name, "x") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
            token = [name]
        except OSError:
            pass  # a read-only cache (complete, or refused by rank 0's prepare_corpus, naming it)
    dist.broadcast_object_list(token, src=0)  # also the barrier: the marker exists before anyone looks
    if token[0] is None:
        return [0] * dist.get_world_size()
    seen = os.path.exists(token[0])
    everyone: List[Optional[Tuple[bool, str]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (seen, socket.gethostname()))
    if dist.get_rank() == 0:
        os.unlink(token[0])  # ours: created above
    return preparing_ranks([e[0] for e in everyone], [e[1] for e in everyone])


def _poll_interval(poll_s: float) -> float:
    from .corpora import stall_bound_s
    bound = stall_bound_s()
    return min(poll_s, bound / 4) if bound else poll_s


def prepare_on_ranks(cfg: DataConfig, poll_s: float = 20.0) -> PreparedCorpus:
    """prepare_corpus on every rank, the cache filled once per folder: by global rank 0 on a
    shared --cache-dir, by each node's first rank on a node-local one (_probe_shared). Collective.

    The preparing ranks work in a thread; every `poll_s` all ranks exchange their state, so a
    preparation longer than the collective timeout is no hang, a failure on a preparing rank ends
    every rank (a ConfigError as a ConfigError: status 2), and ranks that still wait after
    data.prepare_timeout_s give up naming the cache folder's COMPLETE file they wait for. The
    others then open the filled cache."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return prepare_corpus(cfg)
    rank = dist.get_rank()
    preparers = _probe_shared(cfg.cache_dir)
    mine = preparers[rank] == rank
    outcome: Dict[str, object] = {}
    if mine:
        worker = threading.Thread(target=_prepare_into, args=(cfg, outcome), name="prepare-corpus", daemon=True)
        worker.start()
    interval, start = _poll_interval(poll_s), time.monotonic()
    while True:
        if mine:
            worker.join(interval)
        # Every rank decides from the same gathered states, so all of them stop together.
        late = time.monotonic() - start > cfg.prepare_timeout_s
        states: List[Optional[dict]] = [None] * dist.get_world_size()
        dist.all_gather_object(states, _state(mine and worker.is_alive(), mine, outcome, late))
        failed = [(r, s) for r, s in enumerate(states) if s["state"] == "failed"]
        if failed:
            if mine and "failure" in outcome:
                raise outcome["failure"]
            r, s = failed[0]
            raise (ConfigError if s["config_error"] else RuntimeError)(
                s["message"] if s["config_error"] else f"rank {r} failed: {s['message']}")
        busy = [(r, s["folder"]) for r, s in enumerate(states) if s["state"] == "working"]
        if not busy:
            break
        if any(s["late"] for s in states):
            r, folder = busy[0]
            target = os.path.join(folder, COMPLETE) if folder else f"a folder in {cfg.cache_dir}"
            raise ConfigError(f"data.prepare_timeout_s: rank {r} has not finished preparing the corpus after "
                              f"{cfg.prepare_timeout_s:.0f} s ({target} not written yet); a corpus this large "
                              "needs a larger --prepare-timeout-s, or prepare it once beforehand (one process, same "
                              "--cache-dir)")
    return outcome["value"] if mine else prepare_corpus(cfg)


def _state(working: bool, mine: bool, outcome: Dict[str, object], late: bool) -> dict:
    if not mine:
        return {"state": "waiting", "late": late}
    if working:
        return {"state": "working", "folder": outcome.get("folder"), "late": late}
    if "failure" in outcome:
        failure = outcome["failure"]
        return {"state": "failed", "config_error": isinstance(failure, ConfigError), "message": str(failure),
                "late": late}
    return {"state": "done", "late": late}


def _prepare_into(cfg: DataConfig, outcome: Dict[str, object]) -> None:
    try:
        outcome["value"] = prepare_corpus(cfg, on_folder=lambda folder: outcome.__setitem__("folder", folder))
    except Exception as e:  # noqa: BLE001 - handed to every rank by prepare_on_ranks
        outcome["failure"] = e
