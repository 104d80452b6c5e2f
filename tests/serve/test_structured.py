"""Logits processors (logit bias, guided decoding), the tool-call parser and reasoning splitter,
each fed token ids or text directly (no engine)."""

import concurrent.futures
import json
import threading
import time

import jsonschema
import numpy as np
import pytest

from lcjax.serve.loading import ByteTokenizer
from lcjax.serve.reasoning import ReasoningSplitter, prompt_opens_reasoning, split_reasoning
from lcjax.serve.structured import (AfterReasoning, GrammarCompiler, GrammarError, LogitBias, choice_regex,
                                    combine, json_schema_regex, parse_logit_bias, token_bytes, tool_call_regex)
from lcjax.serve.tool_parser import ToolCallParser, openai_tool_call_deltas, parse_tool_calls

TOK = ByteTokenizer()
VOCAB = 272  # wider than the tokenizer, as a model's padded vocabulary is

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3}},
    "required": ["name", "age", "color", "tags"]}

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"]}}}
NOOP = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(TOK, VOCAB, TOK.eos_id)


def sample(processor, rng, logits=None, limit=400):
    """Draw tokens from softmax(logits + bias) until eos; the decoded text."""
    generated = []
    for _ in range(limit):
        bias = processor(generated)
        z = (np.zeros(VOCAB, np.float32) if logits is None else logits(len(generated))) + bias
        p = np.exp(z - z.max())
        token = int(rng.choice(VOCAB, p=p / p.sum()))
        if token == TOK.eos_id:
            return TOK.decode(generated)
        generated.append(token)
    raise AssertionError(f"no eos after {limit} tokens: {TOK.decode(generated)!r}")


def test_json_schema_samples_validate(compiler):
    rng = np.random.default_rng(0)
    regex = json_schema_regex(SCHEMA)
    noise = rng.normal(0, 3, (400, VOCAB)).astype(np.float32)  # a random "model"
    for _ in range(50):
        text = sample(compiler.processor(regex), rng, lambda i: noise[i])
        jsonschema.validate(json.loads(text), SCHEMA)


def test_guided_decoder_bans_everything_else_and_replays(compiler):
    proc = compiler.processor(choice_regex(["yes", "no"]))
    first = proc([])
    assert set(np.flatnonzero(first == 0)) == {TOK.encode("y")[0], TOK.encode("n")[0]}
    assert np.isneginf(first[259:]).all()  # ids past the tokenizer's vocabulary stay banned
    done = proc(TOK.encode("yes"))
    assert list(np.flatnonzero(done == 0)) == [TOK.eos_id]
    again = proc(TOK.encode("n"))  # a different history: the automaton starts over
    assert list(np.flatnonzero(again == 0)) == [TOK.encode("o")[0]]
    assert proc(TOK.encode("x")) is None and proc.broken  # an impossible token: constraint off


def test_tool_call_regex_gives_parseable_calls(compiler):
    rng = np.random.default_rng(1)
    tools = [WEATHER, NOOP]
    for name, parallel in ((None, True), ("get_weather", False)):
        regex = tool_call_regex(tools, name, parallel=parallel)
        for _ in range(10):
            text = sample(compiler.processor(regex), rng, limit=2000)
            content, calls = parse_tool_calls(text, ["get_weather", "noop"])
            assert content is None and calls, text
            for call in calls:
                if name:
                    assert call["name"] == name
                if call["name"] == "get_weather":
                    jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])
    with pytest.raises(GrammarError, match="no tool named 'nope'"):
        tool_call_regex(tools, "nope")


def test_bad_schema_is_a_grammar_error():
    with pytest.raises(GrammarError, match="unsupported JSON schema"):
        json_schema_regex({"type": "object", "properties": {"x": {"type": "no-such-type"}}})


def test_logit_bias_and_combine(compiler):
    assert parse_logit_bias({"5": 2, "7": -100}, VOCAB) == {5: 2.0, 7: -100.0}
    for bad, match in (({"x": 1}, "'x' is not a token id"), ({"999": 1}, "outside"), ({"5": 101}, "101")):
        with pytest.raises(ValueError, match=match):
            parse_logit_bias(bad, VOCAB)
    bias = LogitBias(VOCAB, {5: 2.0}, allowed=[5, 6])
    assert bias([])[5] == 2 and bias([])[6] == 0 and np.isneginf(bias([])[7])
    guided = compiler.processor(choice_regex(["ab"]))
    both = combine([None, LogitBias(VOCAB, {TOK.encode("a")[0]: 3.0}), guided])
    out = both([])
    assert out[TOK.encode("a")[0]] == 3 and np.isneginf(out[TOK.encode("b")[0]])
    assert combine([None]) is None


def test_token_bytes_of_a_byte_level_hf_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from lcjax.serve.loading import HFTokenizer

    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["héllo wörld {\"a\": 1}"] * 20, trainer)
    tok = HFTokenizer(hf, 0, hf.token_to_id("</s>"))
    table = token_bytes(tok)
    assert hf.token_to_id("</s>") not in table
    for token, data in table.items():  # every token's bytes are what decoding it gives
        assert data.decode("utf-8", "replace") == hf.decode([token]) or b"\xc3" in data or data[:1] >= b"\x80"
    assert b"".join(table[t] for t in tok.encode("héllo wörld")) == "héllo wörld".encode()


# ---------------------------------------------------------------- parsers


def test_tool_parser_whole_and_malformed():
    text = ('Let me check. <longcat_tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</longcat_tool_call>\n<longcat_tool_call>{"name": "noop"}</longcat_tool_call>')
    content, calls = parse_tool_calls(text, ["get_weather", "noop"])
    assert content == "Let me check."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                        ("noop", {})]
    for broken in ('<longcat_tool_call>{"name": "get_weather", "arguments": {</longcat_tool_call>',
                   '<longcat_tool_call>{"arguments": {}}</longcat_tool_call>',
                   '<longcat_tool_call>{"name": "unknown"}</longcat_tool_call>'):
        assert parse_tool_calls(broken, ["get_weather"]) == (broken, [])
    unclosed = '<longcat_tool_call>{"name": "noop", "arguments": {}}'
    assert [c["name"] for c in parse_tool_calls(unclosed, ["noop"])[1]] == ["noop"]


def stream_events(text, names, pieces=1):
    """Feed `text` to a streaming parser `pieces` characters at a time; its events."""
    parser = ToolCallParser(names, stream=True)
    events = []
    for at in range(0, len(text), pieces):
        events += parser.feed(text[at:at + pieces])
    return events + parser.finish()


def test_tool_parser_streams_arguments_piece_by_piece():
    text = ('ok <longcat_tool_call>\n{"name": "noop", "arguments": {"x": 1, "s": "}</longcat_tool"}}\n'
            '</longcat_tool_call>\n<longcat_tool_call>{"arguments": {}, "name": "noop"}</longcat_tool_call>'
            '<longcat_tool_call>{"name": "rm", "arguments": {}}</longcat_tool_call> <longcat_tool')
    content, calls = parse_tool_calls(text, ["noop"])
    assert [json.loads(c["arguments"]) for c in calls] == [{"x": 1, "s": "}</longcat_tool"}, {}]
    for pieces in (1, 3, len(text)):  # tags and the arguments split at every point
        events = stream_events(text, ["noop"], pieces)
        assert "".join(e for e in events if isinstance(e, str)) == content == (
            'ok <longcat_tool_call>{"name": "rm", "arguments": {}}</longcat_tool_call> <longcat_tool')
        starts = [e for e in events if isinstance(e, dict) and "id" in e]
        assert [(e["index"], e["name"]) for e in starts] == [(0, "noop"), (1, "noop")]
        for index, call in enumerate(calls):
            fragments = [e["arguments"] for e in events if isinstance(e, dict) and e["index"] == index
                         and "id" not in e]
            assert "".join(fragments) == call["arguments"]  # the arguments as written, both ways
            first = events.index(starts[index])
            assert all(not isinstance(e, dict) or e["index"] != index for e in events[:first])
        if pieces == 1:  # the first call's arguments arrive as they are written
            assert len([e for e in events if isinstance(e, dict) and e["index"] == 0]) > 10
    # A call cut off mid-arguments: streamed, it keeps what it sent; whole, it is content.
    cut = '<longcat_tool_call>{"name": "noop", "arguments": {"x": [1'
    events = stream_events(cut, ["noop"])
    assert "".join(e.get("arguments", "") for e in events if isinstance(e, dict)) == '{"x": [1'
    assert parse_tool_calls(cut, ["noop"]) == (cut, [])


def test_openai_deltas_of_streamed_calls():
    events = stream_events('<longcat_tool_call>{"name": "noop", "arguments": {"x": 1}}</longcat_tool_call>',
                           ["noop"])
    deltas = openai_tool_call_deltas([e for e in events if isinstance(e, dict)])
    assert deltas[0]["function"] == {"name": "noop", "arguments": ""} and deltas[0]["type"] == "function"
    assert deltas[0]["id"].startswith("call_")
    assert deltas[1:] == [{"index": 0, "function": {"arguments": '{"x": 1}'}}]  # joined fragments


def test_reasoning_splitter():
    text = "pre<longcat_think>I think</longcat_think>answer <longcat_think>x"
    assert split_reasoning(text) == ("I think", "preanswer <longcat_think>x")
    assert split_reasoning("plain") == (None, "plain")
    assert split_reasoning("cut off", starts_in_reasoning=True) == ("cut off", "")
    assert split_reasoning("r</longcat_think>c", starts_in_reasoning=True) == ("r", "c")
    splitter, got = ReasoningSplitter(), []
    for ch in text:
        got.append(splitter.feed(ch))
    got.append(splitter.finish())
    assert "".join(r for r, _ in got) == "I think"
    assert "".join(c for _, c in got) == "preanswer <longcat_think>x"
    assert all("<" not in r for r, _ in got)
    assert prompt_opens_reasoning("<|assistant|>\n<longcat_think>\n") and not prompt_opens_reasoning("hi")


def test_any_object_is_bounded_and_parses(compiler):
    nested = {"type": "object", "properties": {"meta": {"type": "object"}, "n": {"type": "integer"}},
              "required": ["meta", "n"]}
    rng = np.random.default_rng(2)
    closers = np.zeros(VOCAB, np.float32)
    closers[[TOK.encode(c)[0] for c in '"}]']] = 4.0  # a "model" that likes closing things
    for schema in (None, nested):
        regex = json_schema_regex(schema)
        assert "lcjaxanyobject" not in regex and len(regex) < 2000  # outlines-core's own is ~6900
        for _ in range(20):
            value = json.loads(sample(compiler.processor(regex), rng, lambda i: closers))
            assert isinstance(value, dict)
            if schema:
                jsonschema.validate(value, nested)


# ---------------------------------------------------------------- constraints after reasoning


def one_token_text(token):
    return TOK.decode([token])


def test_constraint_starts_after_the_think_block(compiler):
    regex = json_schema_regex(SCHEMA)
    rng = np.random.default_rng(3)
    think = TOK.encode("free <text> {{ ] not json </longcat_thin")
    # The prompt opened the block: no mask while thinking, however un-JSON the text.
    gate = AfterReasoning(compiler.processor(regex), one_token_text, starts_in_reasoning=True)
    assert all(gate(think[:i]) is None for i in range(len(think) + 1))
    generated = think + TOK.encode("k>")  # the end tag arrives across tokens
    first = gate(generated)
    assert set(np.flatnonzero(first == 0)) == {TOK.encode("{")[0]}  # the JSON starts from scratch
    noise = rng.normal(0, 3, (400, VOCAB)).astype(np.float32)
    for _ in range(5):
        gate = AfterReasoning(compiler.processor(regex), one_token_text, starts_in_reasoning=True)
        reply = TOK.decode(generated) + sample(lambda ids: gate(generated + ids), rng, lambda i: noise[i])
        reasoning, content = split_reasoning(reply, starts_in_reasoning=True)
        assert reasoning == "free <text> {{ ] not json "
        jsonschema.validate(json.loads(content), SCHEMA)
    # No block opened: the constraint holds from the first token, as without a reasoning parser.
    gate = AfterReasoning(compiler.processor(regex), TOK.decode)
    assert set(np.flatnonzero(gate([]) == 0)) == {TOK.encode("{")[0]}


def test_a_one_token_think_start_may_open_the_block(compiler):
    start, end = 260, 261  # past the byte vocabulary, as special tokens are
    text = {start: "<longcat_think>", end: "</longcat_think>"}.get
    regex = choice_regex(["yes", "no"])
    gate = AfterReasoning(compiler.processor(regex), lambda t: text(t) or one_token_text(t), False, start, end)
    allowed = set(np.flatnonzero(gate([]) == 0))
    assert allowed == {TOK.encode("y")[0], TOK.encode("n")[0], start}
    assert gate([start]) is None and gate([start] + TOK.encode("hmm, <maybe>")) is None
    after = gate([start] + TOK.encode("hmm") + [end])
    assert set(np.flatnonzero(after == 0)) == {TOK.encode("y")[0], TOK.encode("n")[0]}
    gate = AfterReasoning(compiler.processor(regex), one_token_text, False, start, end)
    assert list(np.flatnonzero(gate(TOK.encode("n")) == 0)) == [TOK.encode("o")[0]]  # no block: constrained


def test_grammar_builds_are_shared_while_in_flight(monkeypatch):
    fresh = GrammarCompiler(TOK, VOCAB, TOK.eos_id)
    build, threads = fresh._build_index, []

    def slow_build(regex):
        threads.append(threading.current_thread().name)
        time.sleep(0.3)
        return build(regex)

    monkeypatch.setattr(fresh, "_build_index", slow_build)
    regexes = [choice_regex(["a", "b"])] * 6 + [choice_regex(["c"])] * 2
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        indexes = list(pool.map(fresh.index, regexes))
    assert fresh.num_builds == 2 and all(i is indexes[0] for i in indexes[:6])
    assert all(name.startswith("lcjax-grammar") for name in threads)
    assert fresh.index_future(regexes[0]).done() and fresh.num_builds == 2  # cached
    with pytest.raises(GrammarError):  # a failed build is raised to every waiter, not cached
        fresh.index("(")
    assert fresh.num_builds == 3
