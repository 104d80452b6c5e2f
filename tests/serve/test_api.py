"""The HTTP API end to end: a real server (tests/serve/conftest.py) driven by the official
`openai` client and by raw HTTP where the wire format itself is under test."""

import asyncio
import contextlib
import importlib.util
import json
import re
import time

import httpx
import openai
import pytest

from tests.serve.conftest import MAX_MODEL_LEN

IGNORE_EOS = {"ignore_eos": True}


# ---------------------------------------------------------------- helpers


def wait_idle(served, timeout=30.0):
    """Wait until no request runs or waits; then every KV page must be free (no leak)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = served.async_engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0:
            assert stats.free_pages == stats.total_pages, f"KV pages leaked: {stats}"
            return stats
        assert time.monotonic() < deadline, f"engine still busy: {stats}"
        time.sleep(0.02)


def post(served, path, body=None, content=None, **kwargs):
    headers = {"content-type": "application/json"}
    return httpx.post(served.url + path, json=body, content=content, headers=headers, timeout=60, **kwargs)


def sse_lines(served, path, body):
    """The non-empty lines of an SSE response, after checking its status and content type."""
    with httpx.stream("POST", served.url + path, json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line for line in response.iter_lines() if line]


def metric(served, name, **labels):
    text = httpx.get(served.url + "/metrics", timeout=10).text
    want = {"model_name": served.model, **labels}
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match:
            got = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if all(got.get(k) == v for k, v in want.items()):
                total += float(match.group(2))
    return total


@contextlib.contextmanager
def patched_step(served, wrapper):
    """Replace the engine's step (as seen by the engine thread) with wrapper(original)."""
    engine = served.engine
    engine.step = wrapper(type(engine).step.__get__(engine))
    try:
        yield
    finally:
        del engine.step


def slow_step(delay):
    def wrap(step):
        def slow():
            time.sleep(delay)
            return step()
        return slow
    return wrap


# ---------------------------------------------------------------- simple endpoints


def test_models_health_version(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [served.model]
    assert models.data[0].max_model_len == MAX_MODEL_LEN
    assert httpx.get(served.url + "/health").status_code == 200
    assert "version" in httpx.get(served.url + "/version").json()


def test_tokenize_detokenize(served):
    tok = served.tokenizer
    got = post(served, "/tokenize", {"prompt": "hello"}).json()
    assert got == {"tokens": tok.encode("hello"), "count": 5, "max_model_len": MAX_MODEL_LEN}
    chat = post(served, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tok.encode("<|user|>\nhi\n<|assistant|>\n")  # the built-in template
    assert post(served, "/detokenize", {"tokens": got["tokens"]}).json() == {"prompt": "hello"}
    bad = post(served, "/detokenize", {"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# ---------------------------------------------------------------- generation


def test_completion_counts_logprobs_and_multiple_prompts(served):
    client = served.client()
    out = client.completions.create(model=served.model, prompt="The cat", max_tokens=6, logprobs=1,
                                    extra_body=IGNORE_EOS)
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == 7 and out.usage.completion_tokens == 6
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 6
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    # The top-1 entry, plus the sampled token when it is not the top one (as vLLM lists it).
    for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs,
                                   choice.logprobs.top_logprobs):
        assert token in top and 1 <= len(top) <= 2 and max(top.values()) >= logprob
        assert top[token] == logprob or token == "\ufffd"  # bytes >= 128 all decode to U+FFFD alone

    # Token-id prompts, several of them, each with n=2: choice index = prompt * n + i.
    out = client.completions.create(model=served.model, prompt=[[5, 6, 7], [8, 9]], n=2, max_tokens=3,
                                    extra_body=IGNORE_EOS)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 12
    wait_idle(served)


def test_seeded_stream_matches_non_stream(served):
    client = served.client()
    kwargs = dict(model=served.model, prompt="abc", max_tokens=8, temperature=1.0, seed=1234,
                  extra_body=IGNORE_EOS)
    full = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == full  # same seed, same text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_stream_wire_format(served):
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": True, "n": 2, "stream_options": {"include_usage": True}, "ignore_eos": True}
    lines = sse_lines(served, "/v1/chat/completions", body)
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    # Each choice opens with the role and ends with its finish_reason; usage comes last, alone.
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "length"
        assert all(m["finish_reason"] is None for m in mine[:-1])
    assert chunks[-1]["choices"] == []
    prompt_len = len(served.tokenizer.encode("<|user|>\nhi\n<|assistant|>\n"))
    assert chunks[-1]["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 8,
                                   "total_tokens": prompt_len + 8}


def test_chat_non_stream_and_openai_stream(served):
    client = served.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    out = client.chat.completions.create(model=served.model, messages=messages, max_completion_tokens=5,
                                         logprobs=True, top_logprobs=1, seed=7, extra_body=IGNORE_EOS)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 5 and len(choice.logprobs.content) == 5
    assert all(len(t.top_logprobs) == 1 for t in choice.logprobs.content)
    stream = client.chat.completions.create(model=served.model, messages=messages, max_tokens=5, seed=7,
                                            logprobs=True, top_logprobs=1, stream=True, extra_body=IGNORE_EOS)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # usage only with stream_options.include_usage


def test_32_concurrent_streams_complete_with_exact_token_counts(served):
    async def one(client, i):
        n = 2 + i % 5
        common = dict(model=served.model, max_tokens=n, stream=True, extra_body=IGNORE_EOS,
                      stream_options={"include_usage": True})
        if i % 2:
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": f"request {i}"}], logprobs=True, top_logprobs=1, **common)
        else:
            stream = await client.completions.create(prompt=f"request {i}", logprobs=1, **common)
        tokens, finish, usage = 0, None, None
        async for chunk in stream:
            for c in chunk.choices:
                if c.logprobs is not None:
                    tokens += len(c.logprobs.content if i % 2 else c.logprobs.tokens)
                finish = c.finish_reason or finish
            usage = chunk.usage or usage
        return n, tokens, finish, usage.completion_tokens

    async def main():
        client = served.async_client()
        try:
            return await asyncio.gather(*(one(client, i) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert all(r == (n, n, "length", n) for r in results for n in [r[0]]), results
    wait_idle(served)


# ---------------------------------------------------------------- bad input


_LONG = [5] * (MAX_MODEL_LEN + 5)

BAD_REQUESTS = [
    # (path, body (dict, or str sent raw), status, param or None, text expected in the message)
    ("/v1/completions", "{bad json", 400, None, "Malformed JSON"),
    ("/v1/completions", "[1, 2]", 400, None, ""),
    ("/v1/completions", {"prompt": "x", "bogus": 1}, 400, "bogus", "Unrecognized request argument"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "prompt"),
    ("/v1/completions", {"prompt": _LONG}, 400, "prompt", "maximum context length"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", "maximum context length"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 5}, 400, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 1e9}, 400, "presence_penalty", "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "seed": -5}, 400, "seed", "seed"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", ""),
    ("/v1/completions", {"prompt": "x", "n": 10**9}, 400, "n", ""),
    ("/v1/completions", {"prompt": "x", "logprobs": 100}, 400, "logprobs", ""),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 200}}, 400, "logit_bias", "200"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias", "99999"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo", "prompt's log-probabilities"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of", "best_of > n"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, 400, "suffix", "fill-in-the-middle"),
    ("/v1/completions", {"prompt": "x", "skip_special_tokens": False}, 400, "skip_special_tokens", "special"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [10**6]}, 400, "allowed_token_ids", "token id"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "("}, 400, "guided_regex", "guided_regex"),
    ("/v1/completions", '{"prompt": "a\\ud800b"}', 400, "prompt", "lone surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udc00"}]}', 400,
     "messages[0].content", "lone surrogate"),
    ("/v1/completions", {"prompt": [10**6]}, 400, "prompt", "token id"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": "x", "stream": True, "temperature": -1}, 400, "temperature", ""),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', 400, None, ""),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", ""),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None, ""),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs", "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools[0]", "tools[0] must be"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
     400, "tool_choice", "needs 'tools'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {
            "name": "g"}}}, 400, "tool_choice", "'g'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "xml"}}, 400, "response_format", "'xml'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "bogus"}}}}, 400,
     "response_format", "unsupported JSON schema"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template_kwargs": {"messages": []}}, 400, None, "chat_template_kwargs"),
    ("/tokenize", {}, 400, "prompt", ""),
]


@pytest.mark.parametrize("path,body,status,param,text", BAD_REQUESTS,
                         ids=[f"{i}-{p.rsplit('/', 1)[-1]}" for i, (p, *_) in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_openai_error(served, path, body, status, param, text):
    if "model" not in str(body) and isinstance(body, dict) and path.startswith("/v1"):
        body = {"model": served.model, **body}
    response = post(served, path, body) if isinstance(body, dict) else post(served, path, content=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    assert text in error["message"], error


def test_still_serving_after_bad_input_and_no_pages_leak(served):
    out = served.client().completions.create(model=served.model, prompt="ok", max_tokens=2, extra_body=IGNORE_EOS)
    assert out.usage.completion_tokens == 2
    assert httpx.get(served.url + "/nowhere").json()["error"]["type"] == "not_found_error"
    wait_idle(served)


def test_unexpected_exception_is_a_500_error_object(served, monkeypatch):
    def broken(text):
        raise KeyError("tokenizer bug")

    monkeypatch.setattr(served.tokenizer, "encode", broken)
    response = post(served, "/tokenize", {"prompt": "x"})
    assert response.status_code == 500 and response.json()["error"]["type"] == "internal_error"
    monkeypatch.undo()
    assert post(served, "/tokenize", {"prompt": "x"}).status_code == 200


def test_form_encoded_body_is_a_400(served):
    response = httpx.post(served.url + "/v1/completions", content=b"prompt=x",
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400 and "error" in response.json()


def test_openai_client_raises_bad_request(served):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        served.client().completions.create(model=served.model, prompt="x", temperature=-0.5)


def test_client_disconnect_mid_stream_aborts_and_frees_pages(served):
    before = metric(served, "vllm:request_success_total", finished_reason="abort")
    body = {"model": served.model, "prompt": "long", "max_tokens": 100, "stream": True, "ignore_eos": True}
    with patched_step(served, slow_step(0.01)):
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 60
        while metric(served, "vllm:request_success_total", finished_reason="abort") < before + 1:
            assert time.monotonic() < deadline, "the request was not aborted"
            time.sleep(0.05)
    wait_idle(served)


def test_client_disconnect_non_stream_aborts(served):
    before = metric(served, "vllm:request_success_total", finished_reason="abort")
    body = {"model": served.model, "prompt": "long", "max_tokens": 100, "ignore_eos": True}
    with patched_step(served, slow_step(0.01)):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + "/v1/completions", json=body, timeout=0.3)
        deadline = time.monotonic() + 60
        while metric(served, "vllm:request_success_total", finished_reason="abort") < before + 1:
            assert time.monotonic() < deadline, "the request was not aborted"
            time.sleep(0.05)
    wait_idle(served)


def test_engine_error_fails_the_request_and_the_server_keeps_serving(served):
    def failing_once(step):
        state = {"failed": False}

        def fn():
            if not state["failed"]:
                state["failed"] = True
                raise RuntimeError("simulated device failure")
            return step()
        return fn

    body = {"model": served.model, "prompt": "x", "max_tokens": 3, "ignore_eos": True}
    with patched_step(served, failing_once):
        response = post(served, "/v1/completions", body)
    assert response.status_code == 500
    assert "simulated device failure" in response.json()["error"]["message"]
    with patched_step(served, failing_once):
        lines = sse_lines(served, "/v1/completions", {**body, "stream": True})
    assert "simulated device failure" in json.loads(lines[-2][len("data: "):])["error"]["message"]
    assert lines[-1] == "data: [DONE]"
    assert post(served, "/v1/completions", body).status_code == 200
    wait_idle(served)


# ---------------------------------------------------------------- metrics, auth, hooks


def test_metrics(served):
    served.client().completions.create(model=served.model, prompt="m", max_tokens=3, extra_body=IGNORE_EOS)
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:time_per_output_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total"):
        assert metric(served, name) > 0, name
    text = httpx.get(served.url + "/metrics").text
    for gauge in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:gpu_cache_usage_perc",
                  "vllm:avg_generation_throughput_toks_per_s"):
        assert f"\n{gauge}{{" in text, gauge


def test_api_key(served):
    from lcjax.serve.api import build_app
    from lcjax.serve.server import Server

    app = build_app(served.async_engine, served.tokenizer, served.model, api_key="sekret",
                    max_model_len=MAX_MODEL_LEN)
    server = Server(app, "127.0.0.1", 0).start()  # shares the engine; stopping it leaves the engine
    try:
        base = server.url + "/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        response = httpx.get(base + "/models")
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=base, api_key="sekret", max_retries=0)
        assert good.completions.create(model=served.model, prompt="k", max_tokens=1).usage.completion_tokens == 1
        assert httpx.get(server.url + "/health").status_code == 200  # health needs no key
    finally:
        server.stop()
    assert served.async_engine.is_running


def test_heavy_thinking(served):
    if importlib.util.find_spec("lcjax.serve.heavy_thinking") is None:
        body = {"model": served.model, "messages": [{"role": "user", "content": "x"}], "heavy_thinking": {}}
        response = post(served, "/v1/chat/completions", body)
        assert response.status_code == 400 and response.json()["error"]["param"] == "heavy_thinking"
        return
    client = served.client()
    options = {"num_traces": 2, "temperature": 0.8, "return_traces": True}
    out = client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "2+2?"}],
                                         max_tokens=3, seed=3, extra_body={"ignore_eos": True,
                                                                           "heavy_thinking": options})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 2 * 3 + 3  # two traces, then the summary
    assert out.usage.completion_tokens_details.reasoning_tokens == 6
    traces = out.model_extra["heavy_thinking"]["traces"]
    assert [t["completion_tokens"] for t in traces] == [3, 3]
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "x"}],
                                       stream=True, extra_body={"heavy_thinking": options})
    # Unset options take HeavyThinkingConfig's defaults: 3 traces, no traces in the response.
    from lcjax.serve.heavy_thinking import HeavyThinkingConfig
    out = client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "2+2?"}],
                                         max_tokens=1, extra_body={"ignore_eos": True, "heavy_thinking": {}})
    assert out.usage.completion_tokens_details.reasoning_tokens == HeavyThinkingConfig().num_traces == 3
    assert "heavy_thinking" not in (out.model_extra or {})
    bad = post(served, "/v1/chat/completions", {"model": served.model, "messages": [{"role": "user", "content": "x"}],
                                                "heavy_thinking": {"num_traces": 0}})
    assert bad.status_code == 400 and "num_traces" in bad.json()["error"]["param"]
    wait_idle(served)
