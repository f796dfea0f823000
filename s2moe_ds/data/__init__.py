"""The data layer: corpora, tokenizers, the on-disk token cache and the batch samplers.

    corpus = prepare_corpus(DataConfig(dataset="embedded"))   # tokenized once, then memory-mapped
    sampler = ContiguousBatchSampler(corpus.splits["train"], seq_len, batch, rank, world, seed)
    x_BT, y_BT = sampler.next_batch()
"""

from .cache import PreparedCorpus, prepare_corpus
from .classification import ClassificationData, ClassificationDataConfig, ExampleBatchSampler, load_classification
from .config import DataConfig
from .corpora import embedded_text
from .sampler import ContiguousBatchSampler, StreamBatchSampler, eval_batches, stream_eval_batches
from .tokenization import (ByteTokenizer, CharTokenizer, SubwordTokenizer, Tokenizer, check_tokenizer_matches,
                           load_tokenizer)

__all__ = ["ClassificationData", "ClassificationDataConfig", "ExampleBatchSampler", "load_classification", "DataConfig", "PreparedCorpus", "prepare_corpus", "ContiguousBatchSampler", "StreamBatchSampler", "eval_batches",
           "stream_eval_batches",
           "Tokenizer", "ByteTokenizer", "CharTokenizer", "SubwordTokenizer", "load_tokenizer",
           "check_tokenizer_matches", "embedded_text"]
