"""Byte-level BPE: special ids, round trip, train-once-then-load, determinism, bad input."""

import pickle

import pytest
import tokenizers

from lcjax.data import Tokenizer, train_or_load_tokenizer
from lcjax.data.tokenizer import FILENAME, _capped

TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld 雪 🙂\r\n\ttabs", "", " leading space",
         "literal <s> and </s> and <pad> inside text", "\x00\x01 control bytes \ufffd"]


def test_special_token_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert [tokenizer.hf.id_to_token(i) for i in range(3)] == ["<pad>", "<s>", "</s>"]


def test_vocab_within_request_and_merges_learned(tokenizer):
    assert 259 < tokenizer.vocab_size <= 300


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_never_emits_special_ids(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(3 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_pickle_keeps_special_strings_as_text(tokenizer):
    # grain pickles the tokenizer into worker processes; HF's pickle alone loses this setting.
    text = "a</s>b<s><pad>"
    assert pickle.loads(pickle.dumps(tokenizer)).encode(text) == tokenizer.encode(text)
    assert 2 not in tokenizer.encode(text)


def test_decode_drops_special_tokens(tokenizer):
    ids = tokenizer.encode("abc")
    assert tokenizer.decode([1, *ids, 2, 0, 0]) == "abc"


def test_merges_compress_training_text(tokenizer, docs):
    text = docs[1]
    assert len(tokenizer.encode(text)) < 0.7 * len(text.encode())


def test_loads_saved_without_reading_texts(tmp_path, tokenizer):
    tokenizer.save(tmp_path)

    def never():
        raise AssertionError("texts must not be read when tokenizer.json exists")
        yield

    loaded = train_or_load_tokenizer(tmp_path, 300, never())
    assert loaded.to_json() == tokenizer.to_json()
    assert loaded.fingerprint == tokenizer.fingerprint
    assert Tokenizer.from_json(tokenizer.to_json()).encode("def x") == tokenizer.encode("def x")


def test_training_is_deterministic(tmp_path, docs):
    a = train_or_load_tokenizer(tmp_path / "a", 320, iter(docs))
    b = train_or_load_tokenizer(tmp_path / "b", 320, iter(docs))
    assert (tmp_path / "a" / FILENAME).read_text() == (tmp_path / "b" / FILENAME).read_text()
    assert a.fingerprint == b.fingerprint
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [FILENAME]  # no temp files left


def test_capped_bytes():
    texts = ["ab" * 10, "é" * 10, "x" * 100]
    out = list(_capped(iter(texts), 31))
    assert sum(len(t.encode()) for t in out) <= 31
    assert out[:1] == texts[:1] and len(out) == 2


def test_vocab_too_small(tmp_path, docs):
    with pytest.raises(ValueError, match=r"vocab_size=256 .*>= 259"):
        train_or_load_tokenizer(tmp_path, 256, iter(docs))


def test_saved_tokenizer_larger_than_requested(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    with pytest.raises(ValueError, match=rf"{tokenizer.vocab_size} ids but vocab_size=260"):
        train_or_load_tokenizer(tmp_path, 260, iter([]))


def test_wrong_special_ids_rejected():
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.add_special_tokens(["</s>", "<s>", "<pad>"])
    with pytest.raises(ValueError, match=r"'<pad>' has id 2, expected 0"):
        Tokenizer(hf)
