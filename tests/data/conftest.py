"""Shared fixtures: a small synthetic corpus of text files and a 300-id tokenizer trained on it."""

import numpy as np
import pytest

from lcjax.data import DataSpec, train_or_load_tokenizer

WORDS = ("alpha beta gamma delta def class return import yield lambda for while if else "
         "print self None True False ( ) : = + - * [ ] { } é ü 雪 🙂 <s> </s> <pad>").split()


def synthetic_docs(n: int = 40, seed: int = 0) -> list[str]:
    """Unique documents (each starts with its index) from empty to several hundred tokens."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = 0 if i == 7 else int(rng.choice([3, 10, 30, 80, 200]))
        words = rng.choice(WORDS, size=length)
        docs.append("" if length == 0 else f"doc{i}:\n" + " ".join(words) + "\n")
    return docs


def write_text_corpus(directory, docs) -> str:
    """One file per document; returns a glob over them."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc_{i:03d}.txt").write_text(doc, encoding="utf-8")
    return str(directory / "*.txt")


@pytest.fixture(scope="session")
def docs():
    return synthetic_docs()


@pytest.fixture(scope="session")
def corpus_glob(tmp_path_factory, docs):
    return write_text_corpus(tmp_path_factory.mktemp("corpus"), docs)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, docs):
    return train_or_load_tokenizer(tmp_path_factory.mktemp("tok"), 300, iter(docs))


@pytest.fixture
def spec(corpus_glob):
    """Small rows so documents get split, several rows per step, a quarter of documents held out."""
    return DataSpec(source="text", path=corpus_glob, seq_len=32, global_batch=4,
                    heldout_fraction=0.25)
