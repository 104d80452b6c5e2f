"""Training data: corpora, the byte-level BPE tokenizer, and the grain packing pipeline.

- spec: DataSpec (mirrored by the trainer's DataConfig)
- tokenizer: Tokenizer, train_or_load_tokenizer, tokenizer_for
- sources: stdlib_corpus, document_source (text / jsonl / parquet / arrayrecord)
- pipeline: make_iterator, make_eval_batches, iterator_state_to_json, restore_iterator_from_json
"""

from lcjax.data.pipeline import (DataIterator, iterator_state_to_json, make_eval_batches,
                                 make_iterator, restore_iterator_from_json, tokenizer_for,
                                 tokenizer_training_texts)
from lcjax.data.sources import document_source, stdlib_corpus
from lcjax.data.spec import DataSpec
from lcjax.data.tokenizer import Tokenizer, train_or_load_tokenizer

__all__ = [
    "DataIterator", "DataSpec", "Tokenizer", "document_source", "iterator_state_to_json",
    "make_eval_batches", "make_iterator", "restore_iterator_from_json", "stdlib_corpus",
    "tokenizer_for", "tokenizer_training_texts", "train_or_load_tokenizer",
]
