"""Train a byte-level BPE tokenizer and save it in s2moe_ds's tokenizer JSON format.

    python tokenizers/train_subword.py --input embedded --vocab-size 4096 --out tokenizers/embedded_bpe.json

--input is a text file, a folder of *.txt files, or a dataset name (embedded, enwik8, text8,
wikitext-103): the BPE is trained on that corpus's training split, the same code and the same
split that `prepare_corpus` uses with --tokenizer subword.
"""

import argparse
import os
import sys

# This folder is files, never a package (it would shadow the `tokenizers` library); s2moe_ds comes
# from the installed package (make venv installs it in editable mode).
from s2moe_ds.config import ConfigError
from s2moe_ds.data.cache import TRAIN_CHUNK_CHARS, _as_text
from s2moe_ds.data.config import DATASETS, DataConfig
from s2moe_ds.data.corpora import locate
from s2moe_ds.data.tokenization import SubwordTokenizer, word_chunks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="text file, folder of *.txt, or a dataset name")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    parser.add_argument("--split", type=float, nargs=3, default=(0.9, 0.05, 0.05),
                        help="train/valid/test fractions of a single text (default 0.9 0.05 0.05)")
    args = parser.parse_args(argv)
    try:
        if args.input in DATASETS and args.input != "path":
            cfg = DataConfig(dataset=args.input, split=tuple(args.split), tokenizer="subword",
                             subword_vocab_size=args.vocab_size)
        else:
            cfg = DataConfig(dataset="path", path=args.input, split=tuple(args.split), tokenizer="subword",
                             subword_vocab_size=args.vocab_size)
        # The training split streamed, in chunks that cut no word: the corpus is never held whole.
        train = _as_text(locate(cfg).stream("train"))
        name = args.input if args.input in DATASETS else os.path.basename(os.path.normpath(args.input))
        tok = SubwordTokenizer.train(word_chunks(train, TRAIN_CHUNK_CHARS), args.vocab_size,
                                     built_from=f"{name} train split (tokenizers/train_subword.py)")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok.save(args.out)
    ident = tok.identity()
    print(f"wrote {args.out}: vocab {ident['vocab_size']}, sha256 {ident['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
