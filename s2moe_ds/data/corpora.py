"""Raw text per split for each dataset, with the unit its metric counts and an identity to cache on.

`locate(cfg)` is cheap (file sizes and mtimes, a dataset's fingerprint): the cache is keyed on it.
`CorpusSource.read()` produces the text only when a split must be tokenized.
"""

from __future__ import annotations

import glob
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

from ..config import ConfigError
from .config import DataConfig

SPLITS = ("train", "valid", "test")
Text = Union[str, bytes]

# The standard character-level benchmark cut: the first 90M units train, then 5M valid, 5M test.
STANDARD_CUT = (90_000_000, 5_000_000, 5_000_000)

HUB = {
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "enwik8": ("LTCB/enwik8", "enwik8-raw"),  # the whole file as one row
    "text8": ("afmck/text8", None),
}
HUB_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}


@dataclass
class CorpusSource:
    """A corpus located but not read: `identity` keys the cache, `read()` gives the split texts."""

    name: str
    unit: str
    identity: Dict[str, object]
    read: Callable[[], Dict[str, Text]] = field(repr=False)


def unit_for(cfg: DataConfig) -> str:
    """'byte' for enwik8, 'word' for wikitext-103 and subword-tokenized corpora, else 'char'."""
    if cfg.dataset == "enwik8":
        return "byte"
    if cfg.dataset == "wikitext-103" or cfg.tokenizer_kind == "subword":
        return "word"
    if cfg.tokenizer_kind == "file":
        from .tokenization import load_tokenizer
        return "word" if load_tokenizer(cfg.tokenizer).kind == "subword" else "char"
    return "char"


def count_units(text: Text, unit: str, chunk_size: int = 1 << 20) -> int:
    """Bytes, characters, or whitespace-separated words (counted chunk-wise: no list of all words)."""
    if unit == "byte":
        return len(text) if isinstance(text, bytes) else len(text.encode("utf-8"))
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if unit == "char":
        return len(text)
    words, start, n = 0, 0, len(text)
    while start < n:
        end = min(start + chunk_size, n)
        while end < n and not text[end].isspace():  # never cut a word in two
            end += 1
        words += len(text[start:end].split())
        start = end
    return words


def _fraction_split(text: Text, fractions: Tuple[float, float, float]) -> Dict[str, Text]:
    n = len(text)
    n_train = int(round(n * fractions[0]))
    n_valid = int(round(n * fractions[1]))
    return {"train": text[:n_train], "valid": text[n_train:n_train + n_valid], "test": text[n_train + n_valid:]}


def _benchmark_split(text: Text, fractions: Tuple[float, float, float]) -> Dict[str, Text]:
    """enwik8/text8: the standard 90M/5M/5M cut when the text is full size, else the fractions
    (a smaller local copy, e.g. for a smoke test)."""
    if len(text) >= sum(STANDARD_CUT):
        a, b, c = STANDARD_CUT
        return {"train": text[:a], "valid": text[a:a + b], "test": text[a + b:a + b + c]}
    return _fraction_split(text, fractions)


def _file_stamp(path: str) -> Dict[str, object]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _folder_stamp(folder: str) -> List[Dict[str, object]]:
    files = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p))
    return [_file_stamp(p) for p in files]


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


def _read_chunks(path: str, field: str, progress: Dict[str, float]) -> bytes:
    parts = []
    try:
        with open(path, "rb") as f:
            progress["opened"] = 1.0
            while True:
                block = f.read(_READ_CHUNK)
                progress["last"] = time.monotonic()
                if not block:
                    break
                parts.append(block)
    except PermissionError:
        raise ConfigError(f"{field}: {path} is not readable (permission denied); make it readable (chmod a+r) or "
                          "pass a copy you can read") from None
    except IsADirectoryError:
        raise ConfigError(f"{field}: {path} is a folder, not a file; pass the file itself") from None
    except OSError as e:
        raise ConfigError(f"{field}: {path} cannot be read ({e.strerror or e}); check the file and its file "
                          "system, or pass a copy") from None
    return b"".join(parts)


def read_input(path: str, field: str = "data.path") -> bytes:
    """The whole file. With a process group its open and reads run in a helper thread, and a read
    that receives nothing for stall_bound_s() (a FIFO with no writer, a hung network mount) ends
    with ConfigError naming the file and the bound, so that rank 0's data preparation fails, and
    every rank with it, instead of keeping them all waiting."""
    bound = stall_bound_s()
    progress = {"last": time.monotonic()}
    if bound is None:
        return _read_chunks(path, field, progress)
    outcome: Dict[str, object] = {}

    def run():
        try:
            outcome["data"] = _read_chunks(path, field, progress)
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            outcome["error"] = e
    reader = threading.Thread(target=run, name=f"read {os.path.basename(path)}", daemon=True)
    reader.start()
    while reader.is_alive():
        reader.join(min(1.0, bound))
        if reader.is_alive() and time.monotonic() - progress["last"] > bound:
            where = "reading" if "opened" in progress else "opening"
            raise ConfigError(f"{field}: {where} {path} gave no data for {bound:.0f} s (the collective timeout "
                              "that --hang-timeout-s sets): a FIFO with no writer or a hung network mount; pass a regular "
                              "file on a file system that responds")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["data"]


def decode_utf8(data: bytes, path: str, field: str = "data") -> str:
    """The bytes as UTF-8; anything else is refused (with the line) rather than read as U+FFFD."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{field}: {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line "
                          f"{line}); convert it (e.g. iconv -f latin1 -t utf-8) or give a UTF-8 file") from None


def _read_text(path: str) -> str:
    """The file as UTF-8; anything else is refused rather than trained on as U+FFFD."""
    return decode_utf8(read_input(path), path)


def _read_bytes(path: str) -> bytes:
    return read_input(path)


def embedded_text() -> str:
    """English documentation shipped with CPython (pydoc's topics): about 465K characters."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def _as_text(value: Text, unit: str) -> Text:
    return value.encode("utf-8") if unit == "byte" and isinstance(value, str) else value


def _join_rows(rows: List[str]) -> str:
    # Line-per-row datasets (wikitext) keep their newline in each row; others are joined with one.
    if all(r.endswith("\n") for r in rows if r):
        return "".join(rows)
    return "\n".join(rows)


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


def _texts_from_hf(splits: Dict[str, object], cfg: DataConfig, unit: str) -> Dict[str, Text]:
    """The same for a dataset from the hub cache and one from save_to_disk: only the loader differs."""
    field = "data.path" if cfg.path is not None else "data.dataset"

    def text_of(ds) -> str:
        return _join_rows(ds[_hf_text_column(ds, field)])

    found = {ours: next((n for n in names if n in splits), None) for ours, names in HUB_SPLIT_NAMES.items()}
    if all(found.values()):
        texts = {ours: text_of(splits[name]) for ours, name in found.items()}
    else:
        # One stream (enwik8, text8 on the hub): every row of its single split, cut like the raw file.
        if len(splits) != 1:
            raise ConfigError(f"data.dataset: {cfg.dataset} has splits {sorted(splits)}; expected train/validation/"
                              "test or a single split holding the whole text")
        whole = text_of(next(iter(splits.values())))
        texts = _benchmark_split(_as_text(whole, unit), cfg.split)
    return {k: _as_text(v, unit) for k, v in texts.items()}


def _load_hub(cfg: DataConfig):
    import datasets
    name, config = HUB[cfg.dataset]
    try:
        return datasets.load_dataset(name, config) if config else datasets.load_dataset(name)
    except Exception as e:  # the library raises many types for "offline and not cached"
        raw = (f", or the raw {cfg.dataset} file" if cfg.dataset in ("enwik8", "text8")
               else ", or its raw files as --train-file/--valid-file/--test-file")
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(
            f"data.dataset: {cfg.dataset!r} ({name}{', ' + config if config else ''}) could not be downloaded "
            f"nor found in the Hugging Face cache ({type(e).__name__}: {reason}). Provide a local copy: --path "
            f"(data.path) to a folder saved with datasets' save_to_disk{raw}") from e


def locate(cfg: DataConfig) -> CorpusSource:
    """Find the corpus of `cfg` without reading its text."""
    unit = unit_for(cfg)
    base = {"dataset": cfg.dataset, "unit": unit}

    if cfg.dataset == "embedded":
        text = embedded_text()
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return CorpusSource("embedded", unit, {**base, "source": "pydoc_data.topics", "sha256": digest,
                                               "split": list(cfg.split)},
                            lambda: {k: _as_text(v, unit) for k, v in _fraction_split(text, cfg.split).items()})

    if cfg.train_file is not None:
        files = {"train": cfg.train_file, "valid": cfg.valid_file, "test": cfg.test_file}
        reader = _read_bytes if unit == "byte" else _read_text
        return CorpusSource(cfg.dataset, unit, {**base, "files": {k: _file_stamp(p) for k, p in files.items()}},
                            lambda: {k: reader(p) for k, p in files.items()})

    if cfg.dataset == "path":
        path = cfg.path
        if os.path.isdir(path):
            files = sorted(p for p in glob.glob(os.path.join(path, "*.txt")) if os.path.isfile(p))
            read_all = lambda: "\n".join(_read_text(p) for p in files)  # noqa: E731
        else:
            files = [path]
            read_all = lambda: _read_text(path)  # noqa: E731
        return CorpusSource("path", unit, {**base, "files": [_file_stamp(p) for p in files],
                                           "split": list(cfg.split)},
                            lambda: {k: _as_text(v, unit) for k, v in _fraction_split(read_all(), cfg.split).items()})

    # Named datasets: a local copy first, else the hub (or its offline cache).
    if cfg.path is not None and os.path.isfile(cfg.path):
        path = cfg.path
        reader = _read_bytes if unit == "byte" else _read_text
        return CorpusSource(cfg.dataset, unit, {**base, "raw_file": _file_stamp(path), "split": list(cfg.split)},
                            lambda: _benchmark_split(reader(path), cfg.split))
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
    return CorpusSource(cfg.dataset, unit, identity, lambda: _texts_from_hf(splits, cfg, unit))
