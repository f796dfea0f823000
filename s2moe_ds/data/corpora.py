"""Raw text per split for each dataset, with the unit its metric counts and an identity to cache on.

`locate(cfg)` is cheap (file sizes and mtimes, a dataset's fingerprint): the cache is keyed on it.
`CorpusSource.stream(split)` gives a split's text as a sequence of pieces of bounded size, read
again from the files on every call: no split, let alone the corpus, is ever held whole in memory.
A fractional split needs the corpus' length first, which one streaming pass counts.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

from ..config import ConfigError
from .config import DataConfig, one_billion_word_files

SPLITS = ("train", "valid", "test")
Text = Union[str, bytes]
Stream = Callable[[], Iterator[Text]]
"""A re-readable text: each call gives a new iterator over its pieces (str, or bytes for byte units)."""

# The standard character-level benchmark cut: the first 90M units train, then 5M valid, 5M test.
STANDARD_CUT = (90_000_000, 5_000_000, 5_000_000)

HUB = {
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "enwik8": ("LTCB/enwik8", "enwik8-raw"),  # the whole file as one row
    "text8": ("afmck/text8", None),
    # One sentence per row; 'train' (the 99 training shards) and 'test' (heldout shard 00000) only.
    "one-billion-word": ("billion-word-benchmark/lm1b", None),
}
HUB_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}
# One Billion Word has no validation split of its own: like Transformer-XL's scripts (the
# paper's backbone), valid is the test set, heldout shard 00000.
HUB_VALID_FALLBACK = {"one-billion-word": "test"}
_ROW_BATCH = 1024


@dataclass
class CorpusSource:
    """A corpus located but not read: `identity` keys the cache, `stream(split)` gives the split's
    text piece by piece (str, or bytes when the unit is 'byte')."""

    name: str
    unit: str
    identity: Dict[str, object]
    splits: Dict[str, Stream] = field(repr=False)
    sizes: Dict[str, Callable[[], Optional[int]]] = field(default_factory=dict, repr=False)
    """Per split, its length in units (exact) or bytes on disk (about the characters), for progress."""

    def stream(self, split: str) -> Iterator[Text]:
        """The pieces of one split's text, read anew."""
        return self.splits[split]()

    def size(self, split: str) -> Optional[int]:
        """About how many units the split holds (None: unknown)."""
        return self.sizes[split]() if split in self.sizes else None

    def read(self) -> Dict[str, Text]:
        """Every split's whole text (small corpora and tools only: memory grows with the corpus)."""
        empty = b"" if self.unit == "byte" else ""
        return {s: empty.join(self.stream(s)) for s in SPLITS}


def unit_for(cfg: DataConfig) -> str:
    """'byte' for enwik8, 'word' for wikitext-103, One Billion Word and subword- or word-tokenized
    corpora, else 'char'."""
    if cfg.dataset == "enwik8":
        return "byte"
    if cfg.dataset in ("wikitext-103", "one-billion-word") or cfg.tokenizer_kind in ("subword", "word"):
        return "word"
    if cfg.tokenizer_kind == "file":
        from .tokenization import load_tokenizer
        return "word" if load_tokenizer(cfg.tokenizer).kind in ("subword", "word") else "char"
    return "char"


def count_units(text: Text, unit: str, chunk_size: int = 1 << 20) -> int:
    """Bytes, characters, or whitespace-separated words (counted chunk-wise: no list of all words)."""
    counter = UnitCounter(unit)
    if isinstance(text, bytes) and unit != "byte":
        text = text.decode("utf-8", errors="replace")
    for start in range(0, len(text), chunk_size):
        counter.add(text[start:start + chunk_size])
    return counter.total


class UnitCounter:
    """Counts a text's metric units piece by piece, wherever the pieces are cut: a word cut in two
    by a piece boundary counts once."""

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.total = 0
        self._open_word = False  # the last piece ended inside a word

    def add(self, piece: Text) -> None:
        if self.unit == "byte":
            self.total += len(piece) if isinstance(piece, bytes) else len(piece.encode("utf-8", "surrogatepass"))
            return
        if isinstance(piece, bytes):
            raise TypeError("count characters and words on decoded text")
        if self.unit == "char":
            self.total += len(piece)
            return
        if not piece:
            return
        self.total += len(piece.split())
        if self._open_word and not piece[0].isspace():
            self.total -= 1  # the word began in the previous piece
        self._open_word = not piece[-1].isspace()


# -- reading files in bounded blocks -------------------------------------------------------------

_READ_CHUNK = 1 << 22


def stall_bound_s() -> Optional[float]:
    """How long reading an input may go without receiving a byte: the collective timeout that
    init_distributed derived from --hang-timeout-s (rank 0 prepares the data while the others wait
    in collectives); None without a process group, where the one process may wait as long as it takes."""
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()):
        return None
    from torch.distributed import distributed_c10d as c10d
    return c10d.default_pg_timeout.total_seconds()


def _blocks(path: str, field: str, progress: Dict[str, float]) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            progress["opened"] = 1.0
            while True:
                block = f.read(_READ_CHUNK)
                progress["last"] = time.monotonic()
                if not block:
                    return
                yield block
    except PermissionError:
        raise ConfigError(f"{field}: {path} is not readable (permission denied); make it readable (chmod a+r) or "
                          "pass a copy you can read") from None
    except IsADirectoryError:
        raise ConfigError(f"{field}: {path} is a folder, not a file; pass the file itself") from None
    except OSError as e:
        raise ConfigError(f"{field}: {path} cannot be read ({e.strerror or e}); check the file and its file "
                          "system, or pass a copy") from None


def iter_input(path: str, field: str = "data.path") -> Iterator[bytes]:
    """The file's bytes in blocks of 4 MiB. With a process group its open and reads run in a
    helper thread (at most two blocks ahead), and a read that receives nothing for stall_bound_s()
    (a FIFO with no writer, a hung network mount) ends with ConfigError naming the file and the
    bound, so that rank 0's data preparation fails, and every rank with it, instead of keeping them
    all waiting."""
    progress = {"last": time.monotonic()}
    bound = stall_bound_s()
    if bound is None:
        yield from _blocks(path, field, progress)
        return
    blocks: "queue.Queue" = queue.Queue(maxsize=2)

    def run():
        try:
            for block in _blocks(path, field, progress):
                blocks.put(("block", block))
            blocks.put(("end", None))
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            blocks.put(("error", e))
    threading.Thread(target=run, name=f"read {os.path.basename(path)}", daemon=True).start()
    while True:
        try:
            kind, value = blocks.get(timeout=bound)
        except queue.Empty:
            where = "reading" if "opened" in progress else "opening"
            raise ConfigError(f"{field}: {where} {path} gave no data for {bound:.0f} s (the collective timeout "
                              "that --hang-timeout-s sets): a FIFO with no writer or a hung network mount; pass a "
                              "regular file on a file system that responds") from None
        if kind == "end":
            return
        if kind == "error":
            raise value
        yield value


def read_input(path: str, field: str = "data.path") -> bytes:
    """The whole file (small inputs: a fine-tuning CSV), read as iter_input reads it."""
    return b"".join(iter_input(path, field))


def _not_utf8(path: str, field: str, data: bytes, at: int, offset: int, lines: int) -> ConfigError:
    line = lines + data.count(b"\n", 0, at) + 1
    return ConfigError(f"{field}: {path} is not UTF-8 text (byte 0x{data[at]:02x} at offset {offset}, line {line}); "
                       "convert it (e.g. iconv -f latin1 -t utf-8) or give a UTF-8 file")


def decode_utf8(data: bytes, path: str, field: str = "data") -> str:
    """The bytes as UTF-8; anything else is refused (with the line) rather than read as U+FFFD."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, field, data, e.start, e.start, 0) from None


def _lines_before(path: str, offset: int, field: str) -> int:
    """Newlines in the file's first `offset` bytes (read again: only an error needs them)."""
    lines, seen = 0, 0
    for block in iter_input(path, field):
        lines += block.count(b"\n", 0, max(offset - seen, 0))
        seen += len(block)
        if seen >= offset:
            break
    return lines


def iter_utf8(blocks: Iterator[bytes], path: str, field: str = "data") -> Iterator[str]:
    """The blocks decoded as one UTF-8 text (a character cut between blocks is joined); anything
    else is refused with its offset and line, as decode_utf8 does."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = 0
    for block in blocks:
        pending = len(decoder.getstate()[0])  # an incomplete character held from the last block
        try:
            text = decoder.decode(block)
        except UnicodeDecodeError as e:
            offset = fed - pending + e.start
            raise _not_utf8(path, field, e.object, e.start, offset, _lines_before(path, offset - e.start, field)) \
                from None
        fed += len(block)
        if text:
            yield text
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        offset = fed - len(e.object) + e.start
        raise _not_utf8(path, field, e.object, e.start, offset, _lines_before(path, offset - e.start, field)) from None


def _file_text(path: str, unit: str, field: str = "data.path") -> Stream:
    if unit == "byte":
        return lambda: iter_input(path, field)
    return lambda: iter_utf8(iter_input(path, field), path, field)


def _string_text(text: str, unit: str, piece: int = 1 << 22) -> Stream:
    def pieces():
        for start in range(0, len(text), piece):
            chunk = text[start:start + piece]
            yield chunk.encode("utf-8") if unit == "byte" else chunk
    return pieces


def _joined(parts: List[Stream], sep: Text) -> Stream:
    """The parts one after the other, `sep` between two."""
    def pieces():
        for i, part in enumerate(parts):
            if i and sep:
                yield sep
            yield from part()
    return pieces


def _as_unit(stream: Stream, unit: str) -> Stream:
    """Pieces of str as UTF-8 bytes for a byte-unit corpus (each piece ends on a character)."""
    if unit != "byte":
        return stream
    return lambda: (p.encode("utf-8") if isinstance(p, str) else p for p in stream())


def _window(stream: Stream, start: int, stop: int) -> Stream:
    """Units [start, stop) of the text."""
    def pieces():
        pos = 0
        for piece in stream():
            end = pos + len(piece)
            if end > start and pos < stop:
                yield piece[max(start - pos, 0):min(stop, end) - pos]
            pos = end
            if pos >= stop:
                return
    return pieces


class _Cut:
    """One text cut into train/valid/test by unit offsets; the length is counted (one streaming
    pass) only when a split is first read."""

    def __init__(self, whole: Stream, fractions: Tuple[float, float, float], standard: bool) -> None:
        self.whole, self.fractions, self.standard = whole, fractions, standard
        self._bounds: Optional[Dict[str, Tuple[int, int]]] = None

    def bounds(self) -> Dict[str, Tuple[int, int]]:
        if self._bounds is None:
            n = sum(len(p) for p in self.whole())
            if self.standard and n >= sum(STANDARD_CUT):
                # enwik8/text8 of full size: the standard 90M/5M/5M cut.
                a, b, c = STANDARD_CUT
                cuts = (a, a + b, a + b + c)
            else:
                n_train = int(round(n * self.fractions[0]))
                n_valid = int(round(n * self.fractions[1]))
                cuts = (n_train, n_train + n_valid, n)
            self._bounds = {"train": (0, cuts[0]), "valid": (cuts[0], cuts[1]), "test": (cuts[1], cuts[2])}
        return self._bounds

    def split(self, name: str) -> Stream:
        return lambda: _window(self.whole, *self.bounds()[name])()

    def streams(self) -> Dict[str, Stream]:
        return {s: self.split(s) for s in SPLITS}

    def sizes(self) -> Dict[str, Callable[[], int]]:
        return {s: (lambda s=s: self.bounds()[s][1] - self.bounds()[s][0]) for s in SPLITS}


def _on_disk(*paths: str) -> Callable[[], int]:
    return lambda: sum(os.path.getsize(p) for p in paths)


def _file_stamp(path: str) -> Dict[str, object]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _folder_stamp(folder: str) -> List[Dict[str, object]]:
    files = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p))
    return [_file_stamp(p) for p in files]


def embedded_text() -> str:
    """English documentation shipped with CPython (pydoc's topics): about 465K characters."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


# -- Hugging Face datasets, row batch by row batch ----------------------------------------------

def _hf_text_column(ds, field: str) -> str:
    if "text" in ds.column_names:
        return "text"
    strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if len(strings) != 1:
        raise ConfigError(f"{field}: the dataset has columns {ds.column_names} and no single text column; "
                          "save it with a 'text' column")
    return strings[0]


def _hf_splits(obj) -> Dict[str, object]:
    """A Dataset (one split) or DatasetDict as {split name: Dataset}."""
    from datasets import Dataset
    if isinstance(obj, Dataset):
        return {"train": obj}
    return dict(obj)


def _hf_identity(splits: Dict[str, object]) -> Dict[str, object]:
    return {name: {"num_rows": ds.num_rows, "fingerprint": getattr(ds, "_fingerprint", None)}
            for name, ds in sorted(splits.items())}


def _hf_text(ds, field: str) -> Stream:
    """The rows of the text column joined: line-per-row datasets (wikitext) keep their newline in
    each row; others are joined with one (deciding which takes one pass over the rows)."""
    column = _hf_text_column(ds, field)
    decided: Dict[str, bool] = {}

    def batches() -> Iterator[List[str]]:
        for batch in ds.iter(batch_size=_ROW_BATCH):
            yield [r or "" for r in batch[column]]

    def pieces():
        if "newline_rows" not in decided:
            decided["newline_rows"] = all(r.endswith("\n") for rows in batches() for r in rows if r)
        for i, rows in enumerate(batches()):
            if decided["newline_rows"]:
                yield "".join(rows)
            else:
                yield ("\n" if i else "") + "\n".join(rows)
    return pieces


def _hf_streams(splits: Dict[str, object], cfg: DataConfig, unit: str) -> Dict[str, Stream]:
    """The same for a dataset from the hub cache and one from save_to_disk: only the loader differs."""
    field = "data.path" if cfg.path is not None else "data.dataset"
    found = {ours: next((n for n in names if n in splits), None) for ours, names in HUB_SPLIT_NAMES.items()}
    if found["valid"] is None and HUB_VALID_FALLBACK.get(cfg.dataset) in splits:
        found["valid"] = HUB_VALID_FALLBACK[cfg.dataset]
    if all(found.values()):
        return {ours: _as_unit(_hf_text(splits[name], field), unit) for ours, name in found.items()}
    # One stream (enwik8, text8 on the hub): every row of its single split, cut like the raw file.
    if len(splits) != 1:
        raise ConfigError(f"data.dataset: {cfg.dataset} has splits {sorted(splits)}; expected train/validation/"
                          "test or a single split holding the whole text")
    whole = _as_unit(_hf_text(next(iter(splits.values())), field), unit)
    return _Cut(whole, cfg.split, standard=True).streams()


def _load_hub(cfg: DataConfig):
    import datasets
    name, config = HUB[cfg.dataset]
    try:
        return datasets.load_dataset(name, config) if config else datasets.load_dataset(name)
    except Exception as e:  # the library raises many types for "offline and not cached"
        raw = {"enwik8": ", or the raw enwik8 file", "text8": ", or the raw text8 file",
               "one-billion-word": ", or the folder extracted from 1-billion-word-language-modeling-benchmark-"
                                   "r13output.tar.gz (its training-monolingual.tokenized.shuffled/ and "
                                   "heldout-monolingual.tokenized.shuffled/ shards)"}.get(
            cfg.dataset, ", or its raw files as --train-file/--valid-file/--test-file")
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(
            f"data.dataset: {cfg.dataset!r} ({name}{', ' + config if config else ''}) could not be downloaded "
            f"nor found in the Hugging Face cache ({type(e).__name__}: {reason}). Provide a local copy: --path "
            f"(data.path) to a folder saved with datasets' save_to_disk{raw}") from e


def _lines_of(files: List[str]) -> Stream:
    """Line files one after the other, a newline added after one that lacks its last."""
    def pieces():
        for path in files:
            last = ""
            for piece in _file_text(path, "word")():
                last = piece[-1]
                yield piece
            if last and last != "\n":
                yield "\n"
    return pieces


def _one_billion_word(cfg: DataConfig, base: Dict[str, object]) -> CorpusSource:
    """The benchmark's own shard layout: the training shards in order, heldout shard 00000 as test
    (and as valid, as Transformer-XL's scripts and the hub copy have it)."""
    train, heldout = one_billion_word_files(cfg.path)
    streams = {"train": _lines_of(train), "valid": _lines_of([heldout]), "test": _lines_of([heldout])}
    identity = {**base, "shards": {"train": [_file_stamp(p) for p in train], "heldout": _file_stamp(heldout)}}
    sizes = {"train": _on_disk(*train), "valid": _on_disk(heldout), "test": _on_disk(heldout)}
    return CorpusSource("one-billion-word", "word", identity, streams, sizes)


def locate(cfg: DataConfig) -> CorpusSource:
    """Find the corpus of `cfg` without reading its text."""
    unit = unit_for(cfg)
    base = {"dataset": cfg.dataset, "unit": unit}

    if cfg.dataset == "embedded":
        text = embedded_text()
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        cut = _Cut(_string_text(text, unit), cfg.split, standard=False)
        return CorpusSource("embedded", unit, {**base, "source": "pydoc_data.topics", "sha256": digest,
                                               "split": list(cfg.split)}, cut.streams(), cut.sizes())

    if cfg.train_file is not None:
        files = {"train": cfg.train_file, "valid": cfg.valid_file, "test": cfg.test_file}
        return CorpusSource(cfg.dataset, unit, {**base, "files": {k: _file_stamp(p) for k, p in files.items()}},
                            {k: _file_text(p, unit) for k, p in files.items()},
                            {k: _on_disk(p) for k, p in files.items()})

    if cfg.dataset == "one-billion-word" and cfg.path is not None and os.path.isdir(cfg.path) \
            and not os.path.exists(os.path.join(cfg.path, "dataset_dict.json")):
        return _one_billion_word(cfg, base)

    if cfg.dataset == "path":
        path = cfg.path
        if os.path.isdir(path):
            files = sorted(p for p in glob.glob(os.path.join(path, "*.txt")) if os.path.isfile(p))
        else:
            files = [path]
        whole = _joined([_file_text(p, unit) for p in files], b"\n" if unit == "byte" else "\n")
        cut = _Cut(whole, cfg.split, standard=False)
        return CorpusSource("path", unit, {**base, "files": [_file_stamp(p) for p in files],
                                           "split": list(cfg.split)}, cut.streams(), cut.sizes())

    # Named datasets: a local copy first, else the hub (or its offline cache).
    if cfg.path is not None and os.path.isfile(cfg.path):
        path = cfg.path
        cut = _Cut(_file_text(path, unit), cfg.split, standard=True)
        return CorpusSource(cfg.dataset, unit, {**base, "raw_file": _file_stamp(path), "split": list(cfg.split)},
                            cut.streams(), cut.sizes())
    if cfg.path is not None:
        import datasets
        try:
            splits = _hf_splits(datasets.load_from_disk(cfg.path))
        except Exception as e:
            raise ConfigError(f"data.path: {cfg.path} is not a folder saved with datasets' save_to_disk "
                              f"({type(e).__name__}: {e})") from e
        source = {"saved_dataset": os.path.abspath(cfg.path), "files": _folder_stamp(cfg.path)}
    else:
        splits = _hf_splits(_load_hub(cfg))
        source = {"hub": list(HUB[cfg.dataset])}
    identity = {**base, **source, "splits": _hf_identity(splits), "split": list(cfg.split)}
    return CorpusSource(cfg.dataset, unit, identity, _hf_streams(splits, cfg, unit))
