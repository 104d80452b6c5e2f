"""Packing invariants: segment ids, positions, targets that never cross documents, long documents."""

import numpy as np
import pytest

from lcjax.data import DataSpec, document_source, make_eval_batches, make_iterator
from lcjax.data.packing import ROW_KEYS, Chunk

S = 32


def _segments(row):
    """[(start, end)] of each segment of a packed row, checking the row's layout on the way."""
    seg = row["segment_ids"]
    used = int((seg > 0).sum())
    assert (seg[:used] > 0).all() and (seg[used:] == 0).all(), "padding only at the end"
    bounds = np.flatnonzero(np.diff(seg[:used])) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, used]
    assert seg[starts].tolist() == list(range(1, len(starts) + 1)), "segment ids 1, 2, 3, ..."
    return list(zip(starts.tolist(), ends.tolist())) if used else []


def _check_row(row, tokenized_docs):
    """All packing invariants for one row; returns its segments as token lists with targets."""
    for key in ("segment_ids", "positions", "inputs", "targets", "loss_mask"):
        assert (row[key][row["segment_ids"] == 0] == 0).all(), f"{key} is 0 on padding"
    assert set(np.unique(row["loss_mask"])) <= {0.0, 1.0}
    assert (row["targets"][row["loss_mask"] == 0] == 0).all()
    pieces = []
    for a, b in _segments(row):
        assert row["positions"][a:b].tolist() == list(range(b - a)), "positions restart per segment"
        inputs, targets, mask = row["inputs"][a:b], row["targets"][a:b], row["loss_mask"][a:b]
        assert (targets[:-1] == inputs[1:]).all() and mask[:-1].all(), "next token inside a segment"
        assert mask.any()
        # The segment, plus its last target when there is one, is a contiguous run of a single
        # document: targets never reach into another document.
        run = inputs.tolist() + ([int(targets[-1])] if mask[-1] else [])
        assert any(_contains(doc, run) for doc in tokenized_docs), "segment crosses documents"
        pieces.append((inputs.tolist(), bool(mask[-1])))
    return pieces


def _contains(doc, run):
    n = len(run)
    return any(doc[i:i + n] == run for i in range(len(doc) - n + 1))


def _tokenized(tokenizer, texts):
    return [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]


def test_chunk_long_document_keeps_every_target():
    ids = np.arange(10, 10 + 2 * S + S // 2, dtype=np.int32)  # 2.5 rows long, ends with "eos"
    chunks = Chunk(S).flat_map(ids)
    assert [len(c["inputs"]) for c in chunks] == [S, S, S // 2]
    assert np.concatenate([c["inputs"] for c in chunks]).tolist() == ids.tolist()
    assert np.concatenate([c["targets"] for c in chunks]).tolist() == ids[1:].tolist() + [0]
    assert sum(int(c["loss_mask"].sum()) for c in chunks) == len(ids) - 1
    for this, nxt in zip(chunks, chunks[1:]):  # a cut loses no target
        assert this["targets"][-1] == nxt["inputs"][0] and this["loss_mask"][-1] == 1


def test_chunk_drops_empty_documents_and_exact_fits():
    assert Chunk(S).flat_map(np.array([2], np.int32)) == []  # just eos: nothing to learn
    # S text tokens + eos: the trailing lone eos has no target, so one chunk with S targets.
    chunks = Chunk(S).flat_map(np.arange(3, 3 + S + 1, dtype=np.int32))
    assert [len(c["inputs"]) for c in chunks] == [S] and chunks[0]["loss_mask"].sum() == S


def test_train_rows_invariants(spec, tokenizer, docs):
    it = make_iterator(spec, tokenizer, host_index=0, host_count=1)
    tokenized = _tokenized(tokenizer, docs)
    split_seen = 0
    for _ in range(12):
        batch = next(it)
        assert sorted(batch) == sorted(ROW_KEYS)
        for key, value in batch.items():
            assert value.shape == (4, S)
            assert value.dtype == (np.float32 if key == "loss_mask" else np.int32)
        for r in range(4):
            pieces = _check_row({k: v[r] for k, v in batch.items()}, tokenized)
            split_seen += sum(len(p) == S and carried for p, carried in pieces)
    assert split_seen > 0, "some long documents were cut into full-row chunks"


def test_eval_pass_covers_each_heldout_token_once(spec, tokenizer):
    held = document_source(spec, "heldout")
    tokenized = _tokenized(tokenizer, [held[i] for i in range(len(held))])
    batches = make_eval_batches(spec, tokenizer, num_batches=1000, host_index=0, host_count=1)
    pieces = [p for b in batches for r in range(4)
              for p in _check_row({k: v[r] for k, v in b.items()}, tokenized)]
    assert sum(len(p) for p, _ in pieces) == sum(len(d) for d in tokenized if len(d) > 1)
    assert sum(float(b["loss_mask"].sum()) for b in batches) == sum(len(d) - 1 for d in tokenized)
    # The first document lands at the start of the first row (no shuffle).
    first = next(d for d in tokenized if len(d) > 1)
    assert batches[0]["inputs"][0, :min(S, len(first))].tolist() == first[:S]


@pytest.mark.parametrize("seq_len", [2, 5])
def test_tiny_rows(corpus_glob, tokenizer, seq_len):
    spec = DataSpec(source="text", path=corpus_glob, seq_len=seq_len, global_batch=2)
    batch = next(make_iterator(spec, tokenizer, host_index=0, host_count=1))
    assert batch["inputs"].shape == (2, seq_len)
    assert (batch["loss_mask"] > 0).any()
