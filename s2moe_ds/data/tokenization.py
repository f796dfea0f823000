"""Byte, character, word and byte-level BPE tokenizers behind one interface, saved as self-describing JSON.

Every tokenizer has an identity (kind, vocab_size, built_from, sha256 of what defines its ids). A
checkpoint records it, and `check_tokenizer_matches` refuses to resume or sample with another
tokenizer, whose ids would silently mean different symbols.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from ..config import ConfigError
from ..fileio import atomic_write_text

FORMAT = "s2moe_ds.tokenizer"
FORMAT_VERSION = 1
REPLACEMENT = "\ufffd"
_CODEPOINTS = 0x110000


def _sha256_json(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _write_json_atomic(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")


class Tokenizer:
    """The shared interface; subclasses define kind, the ids and the JSON payload."""

    kind = ""
    built_from: str = ""

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: Union[str, bytes]) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_strings(self) -> List[str]:
        """One distinct string per id, in id order: how other tools (the Hugging Face export) name
        the vocabulary. Decoding goes through `decode`, never through these names."""
        raise NotImplementedError

    def _payload(self) -> dict:
        """What defines the ids; hashed into the identity and stored in the JSON file."""
        raise NotImplementedError

    def identity(self) -> Dict[str, object]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "built_from": self.built_from,
                "sha256": _sha256_json({"kind": self.kind, **self._payload()})}

    def save(self, path: str) -> None:
        _write_json_atomic(path, {"format": FORMAT, "version": FORMAT_VERSION, **self.identity(),
                                  **self._payload()})

    def __repr__(self) -> str:
        ident = self.identity()
        return f"{type(self).__name__}(vocab_size={ident['vocab_size']}, sha256={ident['sha256'][:12]})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 (enwik8 is a byte-level benchmark)."""

    kind = "byte"
    built_from = "utf-8 bytes"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: Union[str, bytes]) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        ids_N = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if ids_N.size and (ids_N.min() < 0 or ids_N.max() > 255):
            raise ValueError("byte tokenizer ids must lie in [0, 255]")
        return ids_N.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_strings(self) -> List[str]:
        return [f"<0x{b:02X}>" for b in range(256)]

    def _payload(self) -> dict:
        return {"encoding": "utf-8"}


def code_points(text: str) -> np.ndarray:
    """The text's code points: one byte each for ASCII (str.isascii is O(1)), else 4."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet (sorted), plus a last id for any other character."""

    kind = "char"

    def __init__(self, chars: Sequence[str], built_from: str = "") -> None:
        chars = sorted(set(chars))
        if any(len(c) != 1 for c in chars):
            raise ValueError("a character tokenizer's alphabet must be single characters")
        self.chars: List[str] = chars
        self.built_from = built_from
        self.unk_id = len(chars)
        # A code-point lookup table encodes a whole chunk with one numpy gather instead of a dict per char.
        self._table = np.full(_CODEPOINTS, self.unk_id, dtype=np.int64)
        self._table[[ord(c) for c in chars]] = np.arange(len(chars))
        self._symbols = np.array(chars + [REPLACEMENT])

    @classmethod
    def from_text(cls, text: str, built_from: str) -> "CharTokenizer":
        return cls(set(text), built_from=built_from)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: Union[str, bytes]) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._table[code_points(text)]

    def encoder(self, dtype) -> Callable[[str], np.ndarray]:
        """encode with ids of `dtype` straight from the lookup (the cache's narrow ids)."""
        table = self._table.astype(dtype)
        return lambda text: table[code_points(text)]

    def decode(self, ids: Iterable[int]) -> str:
        ids_N = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if ids_N.size and (ids_N.min() < 0 or ids_N.max() > self.unk_id):
            raise ValueError(f"char tokenizer ids must lie in [0, {self.unk_id}]")
        return "".join(self._symbols[ids_N].tolist())

    def token_strings(self) -> List[str]:
        return self.chars + ["<unk>"]  # every other name is one character, so "<unk>" is distinct

    def _payload(self) -> dict:
        return {"chars": self.chars, "unk_id": self.unk_id}


class SubwordTokenizer(Tokenizer):
    """Byte-level BPE from the Hugging Face `tokenizers` library: lossless on any text."""

    kind = "subword"

    def __init__(self, hf_json: dict, built_from: str = "") -> None:
        from tokenizers import Tokenizer as HFTokenizer
        self.hf_json = hf_json
        self.built_from = built_from
        self._hf = HFTokenizer.from_str(json.dumps(hf_json))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, built_from: str) -> "SubwordTokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers
        hf = HFTokenizer(models.BPE())
        # No prefix space: decode(encode(text)) must give the text back exactly.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(json.loads(hf.to_str()), built_from=built_from)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size()

    def encode(self, text: Union[str, bytes]) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._hf.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
        """Several chunks at once (the library encodes them in parallel)."""
        return [np.asarray(e.ids, dtype=np.int64) for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        return self._hf.decode(ids, skip_special_tokens=False)

    def token_strings(self) -> List[str]:
        by_id = {i: t for t, i in self._hf.get_vocab(with_added_tokens=True).items()}
        return [by_id[i] for i in range(self.vocab_size)]

    def _payload(self) -> dict:
        return {"tokenizer": self.hf_json}


class WordTokenizer(Tokenizer):
    """Whitespace-separated words of a fixed vocabulary, each line a sentence: <S> words </S>
    (One Billion Word's word-level setup). Words outside the vocabulary become <unk>; blank lines
    carry no sentence. Ids: <S> 0, </S> 1, <unk> 2, then the words as the vocabulary lists them
    (by falling count in the training split, ties in code point order)."""

    kind = "word"
    SPECIALS = ("<S>", "</S>", "<unk>")
    bos_id, eos_id, unk_id = 0, 1, 2

    def __init__(self, words: Sequence[str], built_from: str = "", min_count: Optional[int] = None) -> None:
        self.words: List[str] = list(words)
        if len(set(self.words)) != len(self.words) or set(self.words) & set(self.SPECIALS):
            raise ValueError("a word tokenizer's words must be distinct and not <S>, </S> or <unk>")
        if any(not w or any(c.isspace() for c in w) for w in self.words):
            raise ValueError("a word tokenizer's words must be non-empty and hold no whitespace")
        self.built_from = built_from
        self.min_count = min_count
        self._ids = {w: i for i, w in enumerate(self.SPECIALS + tuple(self.words))}

    @classmethod
    def from_counts(cls, counts: Dict[str, int], min_count: int, built_from: str) -> "WordTokenizer":
        kept = [w for w, c in counts.items() if c >= min_count and w not in cls.SPECIALS]
        kept.sort(key=lambda w: (-counts[w], w))
        return cls(kept, built_from=built_from, min_count=min_count)

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.words)

    def encode(self, text: Union[str, bytes]) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        get, unk, out = self._ids.get, self.unk_id, []
        for line in text.split("\n"):
            words = line.split()
            if words:
                out.append(self.bos_id)
                out.extend(get(w, unk) for w in words)
                out.append(self.eos_id)
        return np.asarray(out, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        names = self.token_strings()
        out, line = [], []
        for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids):
            i = int(i)
            if not 0 <= i < len(names):
                raise ValueError(f"word tokenizer ids must lie in [0, {len(names) - 1}]")
            if i == self.eos_id:
                out.append(" ".join(line) + "\n")
                line = []
            elif i != self.bos_id:
                line.append(names[i])
        return "".join(out) + " ".join(line)

    def token_strings(self) -> List[str]:
        return list(self.SPECIALS) + self.words

    def _payload(self) -> dict:
        return {"specials": list(self.SPECIALS), "words": self.words, "min_count": self.min_count}


def build_tokenizer_from_payload(obj: dict) -> Tokenizer:
    kind = obj.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(obj["chars"], built_from=obj.get("built_from", ""))
    if kind == "subword":
        return SubwordTokenizer(obj["tokenizer"], built_from=obj.get("built_from", ""))
    if kind == "word":
        if list(obj.get("specials", ())) != list(WordTokenizer.SPECIALS):
            raise ValueError(f"word tokenizer specials {obj.get('specials')!r}, expected {list(WordTokenizer.SPECIALS)}")
        return WordTokenizer(obj["words"], built_from=obj.get("built_from", ""), min_count=obj.get("min_count"))
    raise ValueError(f"unknown tokenizer kind {kind!r}")


def load_tokenizer(path: str) -> Tokenizer:
    """Read back a tokenizer written by `Tokenizer.save`; its identity must match what the file
    records (a hand-edited file is refused rather than silently changing ids)."""
    from .config import check_input_file
    check_input_file(path, "data.tokenizer", "--tokenizer")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        if obj.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} file (format={obj.get('format')!r})")
        if obj.get("version") != FORMAT_VERSION:
            raise ValueError(f"version {obj.get('version')!r}, this code reads version {FORMAT_VERSION}")
        tok = build_tokenizer_from_payload(obj)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"data.tokenizer: cannot read {path}: {e}; save tokenizers with "
                          "s2moe_ds.data.tokenization (Tokenizer.save or tokenizers/train_subword.py)") from e
    recorded = obj.get("sha256")
    if recorded is not None and recorded != tok.identity()["sha256"]:
        raise ConfigError(f"data.tokenizer: {path} records sha256 {recorded[:12]}... but its content hashes to "
                          f"{tok.identity()['sha256'][:12]}...; the file was edited, restore or re-create it")
    return tok


def _describe(identity: dict) -> str:
    sha = str(identity.get("sha256", "?"))[:12]
    return (f"{identity.get('kind', '?')} tokenizer, vocab {identity.get('vocab_size', '?')}, sha256 {sha}..., "
            f"built from {identity.get('built_from', '?')!r}")


def check_tokenizer_matches(expected_identity: dict, actual_identity: dict, where: str) -> None:
    """Refuse a tokenizer whose ids differ from the one `where` (a checkpoint) was trained with.

    Only kind, vocab_size and sha256 decide: `built_from` is a description, so the same tokenizer
    rebuilt from the same training text, or loaded from the checkpoint's file, matches."""
    keys = ("kind", "vocab_size", "sha256")
    if all(expected_identity.get(k) == actual_identity.get(k) for k in keys):
        return
    raise ConfigError(
        f"data.tokenizer: {where} was trained with a {_describe(expected_identity)}, but this run's tokenizer "
        f"is a {_describe(actual_identity)}; token ids would mean different symbols. Pass the checkpoint's "
        f"tokenizer file (--tokenizer <checkpoint step folder>/tokenizer.json) or the same data settings "
        f"it was trained with")


# -- cutting a streamed text into chunks that tokenize as the whole text does --------------------

def _safe_cut(text: str, start: int, end: int, lines: bool) -> int:
    """The last position p in (start, end) where a chunk may end, or -1. `lines`: just after a
    newline (a word tokenizer's sentences). Else at whitespace that follows a non-whitespace
    character, a newline preferred: byte-level BPE's pre-tokenizer ends a token there whatever
    follows, and starts the next one there whatever came before, so the ids of the chunks joined
    are the ids of the whole text."""
    if lines:
        cut = text.rfind("\n", start, end - 1)
        return cut + 1 if cut >= start else -1
    for space in ("\n", " "):
        p = text.rfind(space, start + 1, end)
        while p > start:
            if not text[p - 1].isspace():
                return p
            p = text.rfind(space, start + 1, p)
    return -1


_NEXT_CUT = {True: re.compile(r"\n(?=.)", re.S), False: re.compile(r"\S(?=[ \n])")}


def _next_cut(text: str, start: int, end: int, lines: bool) -> int:
    """The first position in [start, end) where a chunk may end (as _safe_cut), or -1."""
    m = _NEXT_CUT[lines].search(text, max(start - 1, 0), end)
    return m.start() + 1 if m else -1


def word_chunks(pieces: Iterable[str], size: int, lines: bool = False, longest: int = 64) -> Iterator[str]:
    """The text of `pieces` again, in chunks of about `size` characters that never cut a word (or,
    with `lines`, a line). A stretch of `longest` x size characters without a place to cut (no
    whitespace at all) is cut there: the only case where the chunks' ids may differ from the
    whole text's."""
    buf = ""
    for piece in pieces:
        buf = buf + piece if buf else piece
        start = 0
        while len(buf) - start > size:
            cut = _safe_cut(buf, start, start + size, lines)
            if cut < 0:
                cut = _next_cut(buf, start + size, min(len(buf), start + longest * size), lines)
            if cut < 0:
                if len(buf) - start < longest * size:
                    break  # wait for more text
                cut = start + longest * size
            yield buf[start:cut]
            start = cut
        buf = buf[start:]
    if buf:
        yield buf


# -- applying a tokenizer in worker processes ---------------------------------------------------

_WORKER: Dict[str, object] = {}


def _worker_encode(chunk: str) -> np.ndarray:
    tokenizer = _WORKER["tokenizer"]
    ids = tokenizer.encode(chunk)
    return ids.astype(_WORKER["dtype"])


def encode_parallel(tokenizer: Tokenizer, chunks: Iterable[str], workers: int, dtype) -> Iterator[np.ndarray]:
    """tokenizer.encode of each chunk, in order, computed by `workers` processes (forked: they
    share the tokenizer already built) with at most 2 x workers chunks in flight, so memory stays
    bounded whatever the corpus size. workers <= 1 (or a daemonic process) encodes here."""
    import multiprocessing
    if workers <= 1 or multiprocessing.current_process().daemon:  # a daemonic process may not fork workers
        for chunk in chunks:
            yield tokenizer.encode(chunk).astype(dtype)
        return
    import collections
    import os
    _WORKER.update(tokenizer=tokenizer, dtype=dtype)
    # Workers encode one chunk each with no threads of their own; without this the tokenizers
    # library prints a warning per forked worker once the parent used its thread pool (training).
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(workers)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
        _WORKER.clear()
    try:
        pending: "collections.deque" = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_worker_encode, (chunk,)))
            while len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()
