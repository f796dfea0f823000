"""Which corpus to train on, how to split and tokenize it, and where tokenized splits are cached."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import List, Optional, Tuple

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


DATASETS = ("embedded", "enwik8", "text8", "wikitext-103", "one-billion-word", "path")
TOKENIZER_KINDS = ("auto", "byte", "char", "subword", "word")

# One Billion Word's own layout (the folder 1-billion-word-language-modeling-benchmark-r13output.tar.gz
# unpacks to): 99 training shards news.en-00001-of-00100 ... and 50 heldout shards, of which
# 00000 is the benchmark's test set. The shards are plain UTF-8, one sentence per line, no suffix.
OBW_TRAIN_DIR = "training-monolingual.tokenized.shuffled"
OBW_HELDOUT_DIR = "heldout-monolingual.tokenized.shuffled"
OBW_TEST_SHARD = "news.en.heldout-00000-of-00050"
_OBW_TRAIN_SHARD = re.compile(r"news\.en-\d{5}-of-00100")
_OBW_FIX = ("pass --path the folder unpacked from 1-billion-word-language-modeling-benchmark-r13output.tar.gz, "
            f"which holds {OBW_TRAIN_DIR}/ and {OBW_HELDOUT_DIR}/ (or leave --path out to use the hub copy)")


def one_billion_word_files(path: str) -> Tuple[List[str], str]:
    """(training shards in order, the test shard) of One Billion Word's folder `path`; a folder
    that is not laid out so is refused, naming what is missing."""
    train_dir, heldout_dir = os.path.join(path, OBW_TRAIN_DIR), os.path.join(path, OBW_HELDOUT_DIR)
    for folder in (train_dir, heldout_dir):
        if not os.path.isdir(folder):
            fail("data.path", f"{path} has no folder {os.path.basename(folder)}/ ({folder} not found); {_OBW_FIX}")
        check_readable_folder(folder, "data.path", "--path")
    train = sorted(os.path.join(train_dir, n) for n in os.listdir(train_dir) if _OBW_TRAIN_SHARD.fullmatch(n))
    if not train:
        fail("data.path", f"{train_dir} holds no training shard (news.en-NNNNN-of-00100); {_OBW_FIX}")
    test = os.path.join(heldout_dir, OBW_TEST_SHARD)
    if not os.path.exists(test):
        fail("data.path", f"{test} not found: heldout shard 00000 is the benchmark's test set; {_OBW_FIX}")
    for shard in train + [test]:  # a FIFO or an unreadable shard: named now, not while reading
        check_input_file(shard, "data.path", "--path")
    return train, test


@dataclass
class DataConfig:
    """The corpus and its tokenization; every value is checked here, before anything is read."""

    dataset: str = "embedded"
    """'embedded' (CPython's pydoc topics, no download), 'enwik8', 'text8', 'wikitext-103',
    'one-billion-word', or 'path' (a local text file or folder given by data.path)."""
    path: Optional[str] = None
    """For 'path': a text file or a folder of *.txt files (sorted, joined with newlines). For a named
    dataset: an optional local copy, a folder saved with datasets' save_to_disk, (enwik8, text8)
    the raw file, or (one-billion-word) the benchmark's unpacked folder holding
    training-monolingual.tokenized.shuffled/ and heldout-monolingual.tokenized.shuffled/."""
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
    """'auto' (byte for enwik8, subword for wikitext-103, word for one-billion-word, char otherwise),
    'byte', 'char', 'subword', 'word', or the path of a saved tokenizer JSON file (e.g. a
    checkpoint's tokenizer.json)."""
    subword_vocab_size: int = 16384
    """Vocabulary of the byte-level BPE trained on the training split when the tokenizer is 'subword'
    (or 'auto' on wikitext-103); a small corpus may yield fewer tokens."""
    word_min_count: int = 3
    """With the 'word' tokenizer: a training-split word seen fewer times becomes <unk> (3 is One
    Billion Word's vocabulary, about 793k words)."""
    cache_dir: str = "~/.cache/s2moe_ds"
    """Where tokenized splits (and tokenizers built from a corpus) are cached; '~' is expanded. On a
    folder every node sees, global rank 0 prepares them; on a node-local one, each node's first
    rank (found out at the start with a marker file: data/cache.py)."""
    tokenize_workers: int = 0
    """Worker processes that apply a subword or word tokenizer to the corpus while the cache is
    filled (0: one per CPU this process may use)."""
    prepare_timeout_s: float = 86400.0
    """How long the ranks that wait for a cache another rank fills wait before giving up, naming
    the file they wait for."""

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
        for name, low in (("word_min_count", 1), ("tokenize_workers", 0)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                fail(f"data.{name}", f"must be an integer >= {low}, got {value!r}")
        timeout = self.prepare_timeout_s
        if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 < timeout < float("inf")):
            fail("data.prepare_timeout_s", f"must be a finite number of seconds > 0, got {timeout!r}")
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
                obw = os.path.isdir(os.path.join(self.path, OBW_TRAIN_DIR))
                fail("data.path", f"folder {self.path} holds no *.txt files" + (
                    f"; it holds {OBW_TRAIN_DIR}/: pass --dataset one-billion-word to read its shards" if obw else
                    "; put the text in files named *.txt or pass --path one text file"))
            for text in texts:  # a FIFO or an unreadable file among them: named now, not while reading
                check_input_file(text, "data.path", "--path")
        if self.dataset == "one-billion-word" and os.path.isdir(self.path) \
                and not os.path.exists(os.path.join(self.path, "dataset_dict.json")):
            one_billion_word_files(self.path)
        if self.dataset in ("wikitext-103", "one-billion-word") and os.path.isfile(self.path):
            other = ("the benchmark's unpacked folder" if self.dataset == "one-billion-word" else
                     "its raw files as data.train_file/valid_file/test_file")
            fail("data.path", f"{self.path} is a file; {self.dataset} needs a folder saved with datasets' "
                  f"save_to_disk, or {other}")

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
            return {"enwik8": "byte", "wikitext-103": "subword", "one-billion-word": "word"}.get(self.dataset, "char")
        return self.tokenizer if self.tokenizer in TOKENIZER_KINDS else "file"
