"""Chat SFT data: the loss mask covers exactly the assistant turns (through chunking and packing),
and malformed conversations stop the run naming file and line, or are skipped and counted."""

import json
import logging

import numpy as np
import pytest

from lcjax.data import DataSpec, make_iterator
from lcjax.data import sources
from lcjax.data.chat import tokenize_conversation
from lcjax.data.sources import document_source
from lcjax.serve.chat_template import resolve_chat_template

TEMPLATE = resolve_chat_template(None, None)
CALL = {"id": "c1", "type": "function",
        "function": {"name": "lookup", "arguments": json.dumps({"q": "snow é"})}}


def _conversation(i: int) -> dict:
    return {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"question {i}: alpha beta"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "雪 found"},
        {"role": "assistant", "content": f"answer {i} gamma " + "delta " * (i % 7)},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": [{"type": "text", "text": f"bye {i}"}]},
    ], "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]}


def _write(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture(autouse=True)
def _fresh_scans():
    sources._scan_jsonl.cache_clear()
    sources._late_skips.clear()


def _masked_text(tokenizer, ids, trained):
    """The trained tokens, decoded per maximal run (eos is dropped by decode)."""
    runs, run = [], []
    for tok, t in zip(ids, trained):
        if t:
            run.append(tok)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode([int(t) for t in r]) for r in runs], [int(r[-1]) for r in runs]


def test_mask_covers_exactly_the_assistant_turns(tokenizer):
    conv = _conversation(3)
    out = tokenize_conversation({"messages": conv["messages"], "tools": conv["tools"]}, TEMPLATE,
                                tokenizer)
    texts, lasts = _masked_text(tokenizer, out["ids"], out["trained"])
    call = '<longcat_tool_call>{"name": "lookup", "arguments": {"q": "snow é"}}</longcat_tool_call>'
    assert texts == [call + "\n", "answer 3 gamma delta delta delta \n", "bye 3\n"]
    assert lasts == [tokenizer.eos_id] * 3  # each turn ends in a trained eos
    untrained = tokenizer.decode(out["ids"][out["trained"] == 0])
    for context in ("You are terse.", "question 3", "雪 found", "thanks", "<|assistant|>"):
        assert context in untrained
    assert "answer" not in untrained and "bye" not in untrained


def _chunk_matches(out, inputs, targets, mask) -> bool:
    ids, trained, n = out["ids"], out["trained"], len(inputs)
    for o in range(0, len(ids), 48):
        if not np.array_equal(ids[o:o + n], inputs):
            continue
        expect = np.zeros(n, np.float32)
        k = min(n, len(ids) - o - 1)
        expect[:k] = trained[o + 1:o + 1 + k]
        if np.array_equal(mask, expect) and np.array_equal(targets[:k], ids[o + 1:o + 1 + k]):
            return True
    return False


def test_packing_keeps_masks_aligned(tmp_path, tokenizer):
    path = _write(tmp_path / "chat.jsonl", [_conversation(i) for i in range(24)])
    spec = DataSpec(source="chat", path=str(path), seq_len=48, global_batch=4, heldout_fraction=0.0)
    it = make_iterator(spec, tokenizer, host_index=0, host_count=1, template=TEMPLATE)
    want = [tokenize_conversation(_conversation(i), TEMPLATE, tokenizer) for i in range(24)]
    seen = 0
    for _ in range(6):
        batch = next(it)
        for row in range(4):
            seg, pos = batch["segment_ids"][row], batch["positions"][row]
            for s in set(seg[seg > 0].tolist()):
                cols = np.flatnonzero(seg == s)
                inputs, mask = batch["inputs"][row, cols], batch["loss_mask"][row, cols]
                targets = batch["targets"][row, cols]
                assert pos[cols[0]] == 0
                # Some conversation holds this chunk at a multiple of S with this exact mask.
                assert any(_chunk_matches(out, inputs, targets, mask) for out in want)
                seen += 1
    assert seen > 20
    it.close()


@pytest.mark.parametrize("record, what", [
    ({"messages": []}, r"'messages' is an empty list"),
    ({"messages": [{"content": "hi"}]}, r"messages\[0\]: role=None"),
    ({"messages": [{"role": "user", "content": 5}]}, r"messages\[0\]: content is int"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"text": "x"}, r"no field 'messages'"),
    ('{"messages": ', "not a JSON object"),
])
def test_bad_record_fails_when_the_source_opens(tmp_path, record, what):
    records = [_conversation(i) for i in range(12)]
    records[8] = record
    path = _write(tmp_path / "c.jsonl", records)
    with pytest.raises(ValueError, match=rf"c.jsonl:9: {what}"):
        document_source(DataSpec(source="chat", path=str(path)), "train")


def test_skip_bad_records_counts_them(tmp_path, tokenizer, caplog):
    records = [_conversation(i) for i in range(12)]
    records[2], records[5] = {"messages": []}, {"messages": [{"role": 3, "content": "x"}]}
    path = _write(tmp_path / "c.jsonl", records)
    spec = DataSpec(source="chat", path=str(path), heldout_fraction=0.0, skip_bad_records=True)
    with caplog.at_level(logging.WARNING, logger="lcjax.data"):
        source = document_source(spec, "train")
    convs = [source[i] for i in range(len(source))]
    assert sum(not c["messages"] for c in convs) == 2
    assert any("skipped 2 bad record(s) of the first 12" in r.getMessage() for r in caplog.records)
    assert tokenize_conversation(convs[2], TEMPLATE, tokenizer)["ids"].size == 0


def test_chat_needs_a_template(tmp_path, tokenizer):
    path = _write(tmp_path / "c.jsonl", [_conversation(0)])
    spec = DataSpec(source="chat", path=str(path), heldout_fraction=0.0)
    with pytest.raises(ValueError, match="needs a chat template"):
        make_iterator(spec, tokenizer, host_index=0, host_count=1)


def test_chat_tokenize_pickles_for_workers(tokenizer):
    import pickle

    from lcjax.data.chat import ChatTokenize

    transform = pickle.loads(pickle.dumps(ChatTokenize(tokenizer, TEMPLATE)))
    conv = _conversation(1)
    np.testing.assert_array_equal(transform.map(conv)["trained"],
                                  tokenize_conversation(conv, TEMPLATE, tokenizer)["trained"])
