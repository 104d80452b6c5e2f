"""Training data: corpora, the byte-level BPE tokenizer, and the grain packing pipeline.

- spec: DataSpec (mirrored by the trainer's DataConfig)
- tokenizer: Tokenizer, train_or_load_tokenizer
- sources: stdlib_corpus, document_source (text / jsonl / parquet / arrayrecord)
"""

from lcjax.data.sources import document_source, stdlib_corpus
from lcjax.data.spec import DataSpec
from lcjax.data.tokenizer import Tokenizer, train_or_load_tokenizer

__all__ = ["DataSpec", "Tokenizer", "document_source", "stdlib_corpus", "train_or_load_tokenizer"]
