"""Our tokenizers (data/tokenization.py) behind Transformers' tokenizer interface, for tools that
load an export with AutoTokenizer (lm-evaluation-harness among them).

Ids are exactly ours: text is encoded and decoded by our tokenizer, read from the export's
s2moe_tokenizer.json (identity-checked); Transformers' own splitting on special tokens is not used.
Our vocabularies have no special tokens; a newline stands for the end of a text (eos_token), as
our corpora are plain text whose documents newlines separate.
"""

import os
from typing import Dict, List, Optional, Tuple

from transformers import PreTrainedTokenizer

from ..config import ConfigError
from ..data.tokenization import load_tokenizer

VOCAB_FILE = "s2moe_tokenizer.json"


class S2MoETokenizer(PreTrainedTokenizer):

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(self, vocab_file: str, **kwargs) -> None:
        _check_inside_folder(vocab_file, kwargs.get("name_or_path"))
        self.ours = load_tokenizer(vocab_file)
        self._names: List[str] = self.ours.token_strings()
        self._ids: Dict[str, int] = {name: i for i, name in enumerate(self._names)}
        newline = self.ours.encode("\n")
        if len(newline) == 1:
            kwargs.setdefault("eos_token", self._names[int(newline[0])])
            kwargs.setdefault("pad_token", self._names[int(newline[0])])
        if "<unk>" in self._ids:
            kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._names)

    def get_vocab(self) -> Dict[str, int]:
        return dict(self._ids)

    def tokenize(self, text: str, **kwargs) -> List[str]:
        return self._tokenize(text)

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        return [self._names[i] for i in self.ours.encode(text).tolist()]

    def _convert_token_to_id(self, token: str) -> int:
        if token not in self._ids:
            raise ValueError(f"token {token!r} is not in this vocabulary ({self.vocab_size} tokens, {VOCAB_FILE})")
        return self._ids[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._names[index]

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        return self.ours.decode([self._ids[t] for t in tokens])

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        # The newline that stands for eos is text: it is never skipped.
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        return self.ours.decode(ids)

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str]:
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        self.ours.save(path)
        return (path,)


def _check_inside_folder(vocab_file: str, name_or_path) -> None:
    """Loaded from a local folder, the vocabulary must be a file of that folder: Transformers takes
    a `vocab_file` set in the folder's tokenizer_config.json over the folder's own file, so a
    received export could otherwise make this open any path (a device, a FIFO, another's file)."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not os.path.isdir(name_or_path):
        return
    folder = os.path.realpath(name_or_path)
    real = os.path.realpath(vocab_file)
    if os.path.commonpath([folder, real]) != folder:
        raise ConfigError(f"{os.path.join(name_or_path, 'tokenizer_config.json')}: vocab_file {vocab_file!r} is "
                          f"outside the tokenizer's folder {name_or_path}; an export's vocabulary is its own "
                          f"{VOCAB_FILE}: remove vocab_file from tokenizer_config.json (or the link to outside)")
