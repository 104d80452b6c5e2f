"""Tools, reasoning, structured output, logit bias, Heavy Thinking over HTTP and the smaller
OpenAI/vLLM API details, on the shared tiny-model server (tests/serve/conftest.py).

The tiny model is random, so outputs with a known shape are forced with constrained decoding
(`guided_regex`): that exercises the engine's logits-processor hook and the parsers together.
"""

import json

import httpx
import jsonschema
import openai
import pytest

from tests.serve.conftest import MAX_MODEL_LEN
from tests.serve.test_api import IGNORE_EOS, post, sse_lines, wait_idle
from tests.serve.test_structured import SCHEMA, WEATHER

CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["utc", "cet"]}}, "required": ["tz"]}}}
USER = [{"role": "user", "content": "Weather in Oslo?"}]


def chat(served, **kwargs):
    return served.client().chat.completions.create(model=served.model, messages=kwargs.pop("messages", USER),
                                                   **kwargs)


def stream_chat(served, **kwargs):
    """(reasoning, content, tool calls as {index: dict}, finish reasons) accumulated from a stream."""
    reasoning, content, calls, finish = "", "", {}, []
    for chunk in chat(served, stream=True, **kwargs):
        for c in chunk.choices:
            extra = c.delta.model_extra or {}
            reasoning += extra.get("reasoning_content") or ""
            content += c.delta.content or ""
            for call in c.delta.tool_calls or []:
                calls.setdefault(call.index, {"id": call.id, "name": call.function.name, "arguments": ""})
                calls[call.index]["arguments"] += call.function.arguments or ""
            if c.finish_reason:
                finish.append(c.finish_reason)
    return reasoning, content, calls, finish


# ---------------------------------------------------------------- structured output


@pytest.mark.parametrize("n", [10, pytest.param(50, marks=pytest.mark.slow)])
def test_json_schema_samples_at_temperature_1_all_validate(served, n):
    out = chat(served, n=n, temperature=1.0, max_tokens=200, seed=11,
               response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    assert len(out.choices) == n
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    wait_idle(served)


def test_json_object_and_logit_bias_together(served):
    # Bias towards closing a string / object so the random model ends its object quickly.
    quote, close = (served.tokenizer.encode(c)[0] for c in ('"', "}"))
    out = chat(served, n=2, temperature=1.0, max_tokens=300, seed=5, response_format={"type": "json_object"},
               logit_bias={str(quote): 8, str(close): 8})
    for choice in out.choices:
        assert choice.finish_reason == "stop" and isinstance(json.loads(choice.message.content), dict)


def test_logit_bias_forces_and_bans(served):
    z = served.tokenizer.encode("z")[0]
    out = served.client().completions.create(model=served.model, prompt="abc", max_tokens=6, temperature=1.0,
                                             logit_bias={str(z): 100}, extra_body=IGNORE_EOS)
    assert out.choices[0].text == "zzzzzz"
    greedy = served.client().completions.create(model=served.model, prompt="abc", max_tokens=1, temperature=0,
                                                extra_body=IGNORE_EOS).choices[0].text
    banned = served.tokenizer.encode(greedy)[0]
    again = served.client().completions.create(model=served.model, prompt="abc", max_tokens=1, temperature=0,
                                               logit_bias={str(banned): -100}, extra_body=IGNORE_EOS)
    assert again.choices[0].text != greedy
    allowed = served.client().completions.create(model=served.model, prompt="abc", max_tokens=5, temperature=1.0,
                                                 extra_body={"allowed_token_ids": [z], **IGNORE_EOS})
    assert allowed.choices[0].text == "zzzzz"


def test_guided_choice_and_regex_on_completions(served):
    out = served.client().completions.create(model=served.model, prompt="Pick:", max_tokens=10, n=4,
                                             temperature=1.0, extra_body={"guided_choice": ["yes", "no"]})
    assert {c.text for c in out.choices} <= {"yes", "no"} and all(c.finish_reason == "stop" for c in out.choices)
    out = served.client().completions.create(model=served.model, prompt="n:", max_tokens=10, temperature=1.0,
                                             extra_body={"guided_regex": "[0-9]{3}"})
    assert len(out.choices[0].text) == 3 and out.choices[0].text.isdigit()


# ---------------------------------------------------------------- tools


def test_tool_choice_required_and_named_give_parseable_calls(served):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = chat(served, tools=[WEATHER, CLOCK], tool_choice=choice, n=2, temperature=1.0, max_tokens=145,
                   seed=3, parallel_tool_calls=False)
        for c in out.choices:
            assert c.finish_reason == "tool_calls" and c.message.content is None, c
            assert len(c.message.tool_calls) == 1, c
            for call in c.message.tool_calls:
                tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
                if isinstance(choice, dict):
                    assert call.function.name == "get_weather"
                jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
                assert call.id.startswith("call_") and call.type == "function"
    # Streamed: the same calls arrive as tool_calls deltas.
    _, content, calls, finish = stream_chat(served, tools=[WEATHER], tool_choice="required", max_tokens=270,
                                            temperature=1.0, seed=4, parallel_tool_calls=False)
    assert content == "" and finish == ["tool_calls"] and calls
    for call in calls.values():
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])
    wait_idle(served)


FORCED_CALL = '<longcat_tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}</longcat_tool_call>'


def test_auto_tool_call_parsed_malformed_kept_as_content(served):
    regex = "Checking\\. " + FORCED_CALL.replace("{", "\\{").replace("}", "\\}")
    out = chat(served, tools=[WEATHER], max_tokens=200, extra_body={"guided_regex": regex})
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and message.content == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Oslo", "unit": "c"})]
    _, content, calls, finish = stream_chat(served, tools=[WEATHER], max_tokens=200, extra_body={"guided_regex": regex})
    assert content.strip() == "Checking." and finish == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Oslo",
                                                                                                  "unit": "c"})]
    # A call to an undeclared function, or broken JSON: plain content, finish_reason stop, never a 500.
    for bad in ('<longcat_tool_call>{"name": "rm_rf"}</longcat_tool_call>', "<longcat_tool_call>{oops"):
        escaped = "".join("\\" + ch if ch in "{}" else ch for ch in bad)
        out = chat(served, tools=[WEATHER], max_tokens=100, extra_body={"guided_regex": escaped})
        assert out.choices[0].message.content == bad and not out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "stop"
    # tool_choice none: the block is content.
    out = chat(served, tools=[WEATHER], tool_choice="none", max_tokens=200,
               extra_body={"guided_regex": FORCED_CALL.replace("{", "\\{").replace("}", "\\}")})
    assert out.choices[0].message.content == FORCED_CALL and not out.choices[0].message.tool_calls


def test_streamed_tool_call_arguments_arrive_piece_by_piece(served):
    regex = FORCED_CALL.replace("{", "\\{").replace("}", "\\}")
    deltas = [call for chunk in chat(served, stream=True, tools=[WEATHER], max_tokens=200,
                                     extra_body={"guided_regex": regex})
              for c in chunk.choices for call in c.delta.tool_calls or []]
    first, rest = deltas[0], deltas[1:]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (
        0, "function", "get_weather", "")
    assert first.id.startswith("call_")
    assert len(rest) > 5 and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert "".join(d.function.arguments for d in rest) == '{"city": "Oslo", "unit": "c"}'


def test_tool_messages_are_rendered(served):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = USER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}]
    tokens = post(served, "/tokenize", {"messages": messages}).json()["tokens"]
    text = served.tokenizer.decode(tokens)
    assert '<longcat_tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</longcat_tool_call>' in text
    assert text.endswith("<|tool|>\n-3 C\n<|assistant|>\n")
    out = chat(served, messages=messages, tools=[WEATHER], max_tokens=3, extra_body=IGNORE_EOS)
    assert out.usage.completion_tokens == 3


# ---------------------------------------------------------------- reasoning


def test_reasoning_content_split_streamed_and_switchable(served):
    regex = "<longcat_think>Let me think</longcat_think>The answer"
    out = chat(served, max_tokens=100, extra_body={"guided_regex": regex})
    message = out.choices[0].message
    assert message.model_extra["reasoning_content"] == "Let me think" and message.content == "The answer"
    reasoning, content, _, _ = stream_chat(served, max_tokens=100, extra_body={"guided_regex": regex})
    assert (reasoning, content) == ("Let me think", "The answer")

    from lcjax.serve.api import build_app
    from lcjax.serve.server import Server

    app = build_app(served.async_engine, served.tokenizer, served.model, max_model_len=MAX_MODEL_LEN,
                    reasoning_parser=False)
    server = Server(app, "127.0.0.1", 0).start()  # shares the engine
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        off = client.chat.completions.create(model=served.model, messages=USER, max_tokens=100,
                                             extra_body={"guided_regex": regex})
        assert off.choices[0].message.content == regex and "reasoning_content" not in (
            off.choices[0].message.model_extra or {})
    finally:
        server.stop()


def test_constraint_starts_after_the_think_block_over_http(served):
    from lcjax.serve.api import build_app
    from lcjax.serve.chat_template import DEFAULT_TEMPLATE, ChatTemplate
    from lcjax.serve.server import Server

    opens_block = ChatTemplate(DEFAULT_TEMPLATE.replace("<|assistant|>\n{% endif %}",
                                                        "<|assistant|>\n<longcat_think>{% endif %}"))
    x = served.tokenizer.encode("x")[0]
    for reasoning_parser in (True, False):
        app = build_app(served.async_engine, served.tokenizer, served.model, max_model_len=MAX_MODEL_LEN,
                        chat_template=opens_block, reasoning_parser=reasoning_parser)
        server = Server(app, "127.0.0.1", 0).start()  # shares the engine
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            out = client.chat.completions.create(model=served.model, messages=USER, max_tokens=6, temperature=0,
                                                 logit_bias={str(x): 100}, response_format={"type": "json_object"})
            message = out.choices[0].message
            if reasoning_parser:  # inside the block no mask applies: the bias alone picks the tokens
                assert message.model_extra["reasoning_content"] == "xxxxxx" and not message.content
            else:  # the mask holds from the first token: "x" cannot start a JSON object
                assert message.content.startswith("{"), message.content
        finally:
            server.stop()


# ---------------------------------------------------------------- Heavy Thinking over HTTP


def test_heavy_thinking_budget_fits_and_streams(served):
    # Three 200-token traces are longer than the context: the summary prompt must be trimmed.
    options = {"num_traces": 3, "trace_max_tokens": 200, "summary_max_tokens": 4, "return_traces": True}
    out = chat(served, seed=1, extra_body={"ignore_eos": True, "heavy_thinking": options})
    extra = out.model_extra["heavy_thinking"]
    assert [t["completion_tokens"] for t in extra["traces"]] == [200, 200, 200]
    summary_prompt_tokens = out.usage.prompt_tokens - len(post(served, "/tokenize", {"messages": USER}).json()["tokens"])
    assert summary_prompt_tokens + 4 <= MAX_MODEL_LEN and "[...] " in extra["summary_prompt"]
    assert out.usage.completion_tokens == 600 + 4 and out.choices[0].finish_reason == "length"
    # Streaming: the role chunk, then the summary; usage (with the traces) only when asked for.
    body = {"model": served.model, "messages": USER, "stream": True, "ignore_eos": True, "seed": 1,
            "stream_options": {"include_usage": True},
            "heavy_thinking": {"num_traces": 2, "trace_max_tokens": 5, "summary_max_tokens": 3}}
    chunks = [json.loads(line[6:]) for line in sse_lines(served, "/v1/chat/completions", body)[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 2 * 5 + 3
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 10}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    # No limits at all: traces fill the context, the summary keeps half the room and still fits.
    out = chat(served, seed=2, extra_body={"ignore_eos": True, "heavy_thinking": {"num_traces": 2}})
    prompt_len = len(post(served, "/tokenize", {"messages": USER}).json()["tokens"])
    summary_prompt_tokens = out.usage.prompt_tokens - prompt_len
    summary_tokens = out.usage.completion_tokens - 2 * (MAX_MODEL_LEN - prompt_len)
    assert summary_tokens >= 1 and summary_prompt_tokens + summary_tokens <= MAX_MODEL_LEN
    assert out.choices[0].finish_reason == "length"
    bad = post(served, "/v1/chat/completions", {"model": served.model, "messages": USER,
                                                "heavy_thinking": {"summary_max_tokens": MAX_MODEL_LEN}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "heavy_thinking.summary_max_tokens"
    wait_idle(served)


# ---------------------------------------------------------------- smaller API details


def test_logprobs_zero_echo_and_stop_string(served):
    client = served.client()
    out = client.completions.create(model=served.model, prompt="ab", max_tokens=4, logprobs=0, temperature=1.0,
                                    extra_body=IGNORE_EOS)
    lp = out.choices[0].logprobs
    assert all(isinstance(v, float) and v <= 0 for v in lp.token_logprobs)
    assert [list(top) for top in lp.top_logprobs] == [[t] for t in lp.tokens]  # the sampled token alone
    echoed = client.completions.create(model=served.model, prompt="Hello", max_tokens=3, echo=True, seed=2,
                                       extra_body=IGNORE_EOS)
    plain = client.completions.create(model=served.model, prompt="Hello", max_tokens=3, seed=2, extra_body=IGNORE_EOS)
    assert echoed.choices[0].text == "Hello" + plain.choices[0].text
    streamed = client.completions.create(model=served.model, prompt="Hello", max_tokens=3, echo=True, seed=2,
                                         stream=True, extra_body=IGNORE_EOS)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.choices[0].text
    for keep in (False, True):
        out = client.completions.create(model=served.model, prompt="x", max_tokens=20, stop=["STOP"],
                                        extra_body={"guided_regex": "abcSTOPdef", "include_stop_str_in_output": keep})
        assert out.choices[0].text == ("abcSTOP" if keep else "abc") and out.choices[0].finish_reason == "stop"


def test_vllm_extras_accepted(served):
    client = served.client()
    base = client.completions.create(model=served.model, prompt="abcdef", max_tokens=1, extra_body=IGNORE_EOS)
    extras = {"add_special_tokens": True, "skip_special_tokens": True, "spaces_between_special_tokens": True,
              "include_stop_str_in_output": False, "min_tokens": 0, "priority": 0, **IGNORE_EOS}
    out = client.completions.create(model=served.model, prompt="abcdef", max_tokens=1, extra_body=extras)
    assert out.usage.prompt_tokens == base.usage.prompt_tokens + 1  # bos added
    out = client.completions.create(model=served.model, prompt="abcdef", max_tokens=1,
                                    extra_body={"truncate_prompt_tokens": 2, **IGNORE_EOS})
    assert out.usage.prompt_tokens == 2
    out = chat(served, max_tokens=1, extra_body={"add_special_tokens": False, "skip_special_tokens": True, **IGNORE_EOS})
    assert out.usage.completion_tokens == 1


def test_continue_final_message_and_tokenize_with_tools(served):
    messages = USER + [{"role": "assistant", "content": "It is"}]
    body = {"messages": messages, "continue_final_message": True, "add_generation_prompt": False}
    text = served.tokenizer.decode(post(served, "/tokenize", body).json()["tokens"])
    assert text == "<|user|>\nWeather in Oslo?\n<|assistant|>\nIt is"
    out = chat(served, messages=messages, max_tokens=2, extra_body={**body, **IGNORE_EOS})
    assert out.usage.prompt_tokens == len(text)
    bad = post(served, "/v1/chat/completions", {"messages": messages, "continue_final_message": True,
                                                "add_generation_prompt": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "continue_final_message"
    tools = post(served, "/tokenize", {"messages": USER, "tools": [WEATHER]}).json()["tokens"]
    assert served.tokenizer.decode(tools).startswith("<|system|>\nTools:\n{\"name\": \"get_weather\"")


def test_usage_in_streams_only_when_asked(served):
    body = {"model": served.model, "prompt": "u", "max_tokens": 3, "stream": True, "ignore_eos": True}
    chunks = [json.loads(line[6:]) for line in sse_lines(served, "/v1/completions", body)[:-1]]
    assert all("usage" not in c for c in chunks)
    chunks = [json.loads(line[6:]) for line in sse_lines(
        served, "/v1/completions", {**body, "stream_options": {"include_usage": True}})[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all("usage" not in c for c in chunks[:-1])
    assert httpx.get(served.url + "/health").status_code == 200


def test_heavy_thinking_stream_disconnect_during_traces_aborts_them(served):
    import time

    from tests.serve.test_api import metric, patched_step, slow_step

    aborted = metric(served, "vllm:request_success_total", finished_reason="abort")
    generated = served.async_engine.stats().generated_tokens_total
    body = {"model": served.model, "messages": USER, "stream": True, "ignore_eos": True,
            "heavy_thinking": {"num_traces": 2, "trace_max_tokens": 300, "summary_max_tokens": 4}}
    with patched_step(served, slow_step(0.01)):
        with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()  # kept: dropping the iterator closes the connection
            assert json.loads(next(lines)[6:])["choices"][0]["delta"]["role"] == "assistant"
            deadline = time.monotonic() + 120  # a cold engine compiles its steps first
            while served.async_engine.stats().generated_tokens_total < generated + 4:  # traces are generating
                assert time.monotonic() < deadline, "the traces never started"
                time.sleep(0.02)
        wait_idle(served, timeout=60)  # both traces aborted, their pages freed, no summary started
    assert metric(served, "vllm:request_success_total", finished_reason="abort") == aborted + 2
