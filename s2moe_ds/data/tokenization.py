"""Byte, character and byte-level BPE tokenizers behind one interface, saved as self-describing JSON.

Every tokenizer has an identity (kind, vocab_size, built_from, sha256 of what defines its ids). A
checkpoint records it, and `check_tokenizer_matches` refuses to resume or sample with another
tokenizer, whose ids would silently mean different symbols.
"""

from __future__ import annotations

import hashlib
import json
from typing import Dict, Iterable, Iterator, List, Sequence, Union

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
        codepoints_N = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        return self._table[codepoints_N]

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


def build_tokenizer_from_payload(obj: dict) -> Tokenizer:
    kind = obj.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(obj["chars"], built_from=obj.get("built_from", ""))
    if kind == "subword":
        return SubwordTokenizer(obj["tokenizer"], built_from=obj.get("built_from", ""))
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


def iter_chunks(text: Union[str, bytes], chunk_size: int, at_newline: bool = False) -> Iterator[Union[str, bytes]]:
    """Consecutive slices of about chunk_size; with at_newline, each ends just after a newline when
    one is near, so a subword merge is never cut in the middle of a line."""
    newline = "\n" if isinstance(text, str) else b"\n"
    start, n = 0, len(text)
    while start < n:
        end = min(start + chunk_size, n)
        if at_newline and end < n:
            cut = text.rfind(newline, start, end)
            if cut > start:
                end = cut + 1
        yield text[start:end]
        start = end
