"""Which corpus to train on, how to split and tokenize it, and where tokenized splits are cached."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Optional

from ..config import check_choice, fail

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_input_file(path: str, field: str, flag: str) -> None:
    """A file the run reads: present, a regular file, readable. A FIFO or a device is refused here,
    on every rank before any process group exists: opening one blocks until a writer comes (or
    reads without end), which no rank could tell from a slow read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        fail(field, f"file not found: {path}; pass {flag} an existing file")
    except OSError as e:
        fail(field, f"{path} cannot be examined ({e.strerror or e}); fix its permissions or pass another {flag}")
    if stat.S_ISDIR(mode):
        fail(field, f"{path} is a folder, not a file; pass {flag} the file itself")
    for test, name in _KINDS:
        if test(mode):
            fail(field, f"{path} is {name}, not a regular file: reading it could block for ever; copy the data "
                        f"into a regular file and pass {flag} that")
    if not os.access(path, os.R_OK):
        fail(field, f"{path} is not readable (permission denied); make it readable (chmod a+r) or pass {flag} a "
                    "copy you can read")


def check_readable_folder(path: str, field: str, flag: str) -> None:
    """A folder the run lists and reads."""
    if not os.access(path, os.R_OK | os.X_OK):
        fail(field, f"folder {path} is not readable (permission denied); make it readable (chmod a+rx) or pass "
                    f"{flag} a copy you can read")


def check_output_folder(path: str, field: str, flag: str) -> None:
    """A folder the run writes (created if missing): the folder, or else its nearest existing
    parent, must be a folder this process may write to. Checked before any compute, so that a
    read-only mount or a folder of another user is named at once, not at the first save."""
    folder = os.path.abspath(os.path.expanduser(path))
    while not os.path.lexists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if not os.path.isdir(folder):
        fail(field, f"{folder} is a file, not a folder, so {path} cannot be created; pass {flag} a folder path")
    if not os.access(folder, os.W_OK | os.X_OK):
        why = "a read-only file system" if _read_only_mount(folder) else "permission denied"
        what = "" if folder == os.path.abspath(os.path.expanduser(path)) else f" (to create {path} in)"
        fail(field, f"folder {folder}{what} is not writable ({why}); pass {flag} a folder you can write to")


def _read_only_mount(folder: str) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


DATASETS = ("embedded", "enwik8", "text8", "wikitext-103", "path")
TOKENIZER_KINDS = ("auto", "byte", "char", "subword")


@dataclass
class DataConfig:
    """The corpus and its tokenization; every value is checked here, before anything is read."""

    dataset: str = "embedded"
    """'embedded' (CPython's pydoc topics, no download), 'enwik8', 'text8', 'wikitext-103', or 'path'
    (a local text file or folder given by data.path)."""
    path: Optional[str] = None
    """For 'path': a text file or a folder of *.txt files (sorted, joined with newlines). For a named
    dataset: an optional local copy, a folder saved with datasets' save_to_disk, or (enwik8, text8)
    the raw file."""
    train_file: Optional[str] = None
    """Explicit training split file; with valid_file and test_file it replaces the fractional split."""
    valid_file: Optional[str] = None
    """Explicit validation split file (required with train_file)."""
    test_file: Optional[str] = None
    """Explicit test split file (required with train_file)."""
    split: tuple = (0.9, 0.05, 0.05)
    """Train/valid/test fractions of a single text; enwik8 and text8 of full size always use their
    standard 90M/5M/5M cut instead."""
    tokenizer: str = "auto"
    """'auto' (byte for enwik8, subword for wikitext-103, char otherwise), 'byte', 'char', 'subword',
    or the path of a saved tokenizer JSON file (e.g. a checkpoint's tokenizer.json)."""
    subword_vocab_size: int = 16384
    """Vocabulary of the byte-level BPE trained on the training split when the tokenizer is 'subword'
    (or 'auto' on wikitext-103); a small corpus may yield fewer tokens."""
    cache_dir: str = "~/.cache/s2moe_ds"
    """Where tokenized splits (and tokenizers built from a corpus) are cached; '~' is expanded."""

    def __post_init__(self) -> None:
        check_choice(self.dataset, "data.dataset", DATASETS)
        self._check_split()
        self._check_files()
        self._check_tokenizer()
        if not (isinstance(self.subword_vocab_size, int) and not isinstance(self.subword_vocab_size, bool)
                and 257 <= self.subword_vocab_size <= 2**32 - 1):
            # Byte-level BPE starts from the 256 byte symbols, so anything smaller cannot hold them.
            fail("data.subword_vocab_size", f"must be an integer >= 257, got {self.subword_vocab_size!r}")
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            fail("data.cache_dir", f"must be a folder path, got {self.cache_dir!r}")
        self.cache_dir = os.path.abspath(os.path.expanduser(self.cache_dir))
        if os.path.isfile(self.cache_dir):
            fail("data.cache_dir", f"{self.cache_dir} is a file; name a folder (it is created if missing)")

    def _check_split(self) -> None:
        split = self.split
        if isinstance(split, list):
            split = tuple(split)
        numbers = (isinstance(split, tuple) and len(split) == 3
                   and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in split))
        if not numbers or not all(v > 0 for v in split) or abs(sum(split) - 1.0) > 1e-6:
            fail("data.split", f"must be 3 positive fractions (train, valid, test) summing to 1, got {self.split!r}; "
                  "e.g. --split 0.9 0.05 0.05")
        self.split = tuple(float(v) for v in split)

    def _check_files(self) -> None:
        split_files = {"train_file": self.train_file, "valid_file": self.valid_file, "test_file": self.test_file}
        given = {k: v for k, v in split_files.items() if v is not None}
        if self.dataset == "embedded":
            for name, value in {"path": self.path, **given}.items():
                if value is not None:
                    fail(f"data.{name}", "is not used with data.dataset 'embedded' (its text ships with Python); "
                          "use data.dataset 'path' for a local corpus")
            return
        if given:
            missing = [k for k in split_files if k not in given]
            if missing:
                fail(f"data.{missing[0]}", "is required when any of data.train_file/valid_file/test_file is given "
                      "(all three splits come from files then)")
            if self.path is not None:
                fail("data.path", "give either data.path or data.train_file/valid_file/test_file, not both")
            for name, value in given.items():
                check_input_file(value, f"data.{name}", f"--{name.replace('_', '-')}")
            return
        if self.path is None:
            if self.dataset == "path":
                fail("data.path", "is required with data.dataset 'path': a text file or a folder of *.txt files "
                      "(or give data.train_file, valid_file and test_file)")
            return
        if not os.path.exists(self.path):
            fail("data.path", f"not found: {self.path}")
        if os.path.isdir(self.path):
            check_readable_folder(self.path, "data.path", "--path")
        else:
            check_input_file(self.path, "data.path", "--path")
        if self.dataset == "path" and os.path.isdir(self.path):
            texts = [os.path.join(self.path, n) for n in sorted(os.listdir(self.path)) if n.endswith(".txt")]
            texts = [t for t in texts if not os.path.isdir(t)]
            if not texts:
                fail("data.path", f"folder {self.path} holds no *.txt files")
            for text in texts:  # a FIFO or an unreadable file among them: named now, not while reading
                check_input_file(text, "data.path", "--path")
        if self.dataset == "wikitext-103" and os.path.isfile(self.path):
            fail("data.path", f"{self.path} is a file; wikitext-103 needs a folder saved with datasets' "
                  "save_to_disk, or its raw files as data.train_file/valid_file/test_file")

    def _check_tokenizer(self) -> None:
        tok = self.tokenizer
        if not isinstance(tok, str) or not tok:
            fail("data.tokenizer", f"must be one of {', '.join(map(repr, TOKENIZER_KINDS))} or a tokenizer JSON "
                  f"file, got {tok!r}")
        if tok in TOKENIZER_KINDS:
            return
        if not os.path.exists(tok):
            looks_like_path = tok.endswith(".json") or os.sep in tok
            what = "file not found" if looks_like_path else "unknown tokenizer"
            fail("data.tokenizer", f"{what}: {tok!r}; use one of {', '.join(map(repr, TOKENIZER_KINDS))} or the path "
                  "of a saved tokenizer JSON file")
        check_input_file(tok, "data.tokenizer", "--tokenizer")

    @property
    def tokenizer_kind(self) -> str:
        """'byte', 'char', 'subword' or 'file', with 'auto' resolved for the dataset."""
        if self.tokenizer == "auto":
            return {"enwik8": "byte", "wikitext-103": "subword"}.get(self.dataset, "char")
        return self.tokenizer if self.tokenizer in TOKENIZER_KINDS else "file"
