"""The OpenAI-compatible HTTP API (FastAPI) over an AsyncEngine.

Endpoints: POST /v1/completions, /v1/chat/completions (SSE when `stream=true`), /tokenize,
/detokenize; GET /v1/models, /health, /metrics (Prometheus), /version.

Every failure is an OpenAI error object `{"error": {"message", "type", "param", "code"}}`:
malformed JSON, schema violations and bad values (prompt too long, temperature < 0, ...) are
400; a wrong API key 401; an unknown model 404; an engine failure 500; shutting down 503. A
client that disconnects (streaming or not) has its requests aborted, freeing their KV pages.

Streaming follows OpenAI's chunk format: chat streams open with a `{"role": "assistant"}` delta
per choice; one chunk per engine output (several tokens under speculative decoding); each
choice's last chunk carries its finish_reason; only with `stream_options.include_usage` does a
final chunk with empty `choices` carry `usage` (`continuous_usage_stats`: every chunk); then
`data: [DONE]`. The bodies and chunks themselves are built in lcjax/serve/responses.py.

Chat extras: `tools` / `tool_choice` (LongCat tool-call blocks, lcjax/serve/tool_parser.py),
`<longcat_think>` reasoning in `reasoning_content` (`reasoning_parser=False` turns it off),
`response_format` json_object / json_schema. `logit_bias`, `allowed_token_ids`, the vLLM
`guided_*` fields, json output and `tool_choice` "required" or a named function are enforced
by logits processors (lcjax/serve/structured.py) that the engine adds to the logits before
each sampled token, so a forced tool call always parses against the tool's parameters. With
the reasoning parser on, a chat constraint starts after the `<longcat_think>` block (AfterReasoning).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from lcjax.serve.async_engine import AsyncEngine, EngineError, EngineShutdown, RequestStream
from lcjax.serve.chat_template import ChatTemplate, resolve_chat_template
from lcjax.serve.http_plumbing import ClosingStreamingResponse as _ClosingStreamingResponse
from lcjax.serve.http_plumbing import check_text as _check_text
from lcjax.serve.http_plumbing import error as _error
from lcjax.serve.http_plumbing import install_auth as _install_auth
from lcjax.serve.http_plumbing import named_field as _named_field
from lcjax.serve.http_plumbing import package_version as _version
from lcjax.serve.http_plumbing import install_error_handlers as _install_error_handlers
from lcjax.serve.http_plumbing import unless_disconnected as _unless_disconnected
from lcjax.serve.metrics import CONTENT_TYPE
from lcjax.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                  TokenizeRequest, error_body)
from lcjax.serve.reasoning import THINK_END, THINK_START, prompt_opens_reasoning, tag_token_id
from lcjax.serve.responses import ChatFormat, ChatParsing, CompletionFormat, ResponseFormat, sse
from lcjax.serve.sampling import SamplingParams
from lcjax.serve.structured import (GrammarCompiler, GrammarError, LogitBias, choice_regex, combine,
                                    guided_processor, json_schema_regex, parse_logit_bias, tool_call_regex)

log = logging.getLogger("lcjax.serve")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def build_app(async_engine: AsyncEngine, tokenizer: Any, model_name: str, api_key: Optional[str] = None,
              chat_template: Optional[ChatTemplate] = None, max_model_len: Optional[int] = None,
              reasoning_parser: bool = True) -> FastAPI:
    """A FastAPI app serving `async_engine` under the name `model_name`.

    Args:
      tokenizer: encode(str) -> ids, decode(ids) -> str, eos_id; optional chat_template.
      api_key: when set, /v1/*, /tokenize and /detokenize need `Authorization: Bearer <key>`.
      chat_template: None = the tokenizer's template, else the built-in default.
      max_model_len: prompt + completion limit (default: the engine's).
      reasoning_parser: split `<longcat_think>` blocks of chat output into `reasoning_content`
        (False: they stay in `content`, verbatim).
    """
    serving = _Serving(async_engine, tokenizer, model_name,
                       chat_template or resolve_chat_template(None, tokenizer),
                       max_model_len or async_engine.engine.engine_config.max_model_len, reasoning_parser)
    app = FastAPI(title="lcjax.serve", version=_version())
    app.state.serving = serving
    _install_error_handlers(app)
    if api_key:
        _install_auth(app, api_key)

    app.get("/health")(serving.health)
    app.get("/version")(lambda: {"version": _version()})
    app.get("/metrics")(serving.metrics)
    app.get("/v1/models")(serving.models)
    app.post("/tokenize")(serving.tokenize)
    app.post("/detokenize")(serving.detokenize)
    app.post("/v1/completions")(serving.completions)
    app.post("/v1/chat/completions")(serving.chat_completions)
    return app


# ---------------------------------------------------------------- the endpoints


class _Serving:
    def __init__(self, engine: AsyncEngine, tokenizer: Any, model_name: str, template: ChatTemplate,
                 max_model_len: int, reasoning_parser: bool = True):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.template, self.max_model_len = template, max_model_len
        self.reasoning_parser = reasoning_parser
        model_config = engine.engine.config.model
        self.vocab_size, self.bos_id = model_config.vocab_size, model_config.bos_token_id
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, tokenizer.eos_id)
        self.created = int(time.time())
        self.token_text = functools.lru_cache(maxsize=1 << 16)(lambda t: tokenizer.decode([t]))
        self.think_ids = tuple(tag_token_id(tokenizer, tag) for tag in (THINK_START, THINK_END))

    async def health(self):
        if not self.engine.is_running:
            return _error(503, "the engine is not running", "service_unavailable")
        return {}

    async def metrics(self):
        return Response(self.engine.metrics.exposition(self.engine.stats()), media_type=CONTENT_TYPE)

    async def models(self):
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "lcjax",
            "root": self.model_name, "parent": None, "max_model_len": self.max_model_len}]}

    async def tokenize(self, body: TokenizeRequest):
        self._check_model(body.model)
        _check_text(body.model_dump(exclude_none=True))
        if (body.prompt is None) == (body.messages is None):
            raise APIError("Give exactly one of 'prompt' or 'messages'.", param="prompt")
        if body.prompt is not None:
            tokens = self.tokenizer.encode(body.prompt)
        else:
            tokens = self.tokenizer.encode(self._render_chat(body))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.max_model_len}

    async def detokenize(self, body: DetokenizeRequest):
        self._check_model(body.model)
        self._check_ids(body.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_request(body)
        prompts = [self._adjust_prompt(body, p) for p in self._completion_prompts(body.prompt)]
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
        processors = await self._processors(body, self._guide_regex(body))
        base, stream = await self._start(body, prompts, max_tokens, body.logprobs, "cmpl", processors)
        echo = [self.tokenizer.decode(p) for p in prompts] if body.echo else None
        fmt = CompletionFormat(self.model_name, self.token_text, body, base, prompts, echo_texts=echo)
        if body.stream:
            return self._sse(stream, fmt)
        return await _unless_disconnected(request, self._collect(stream, fmt), stream)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._check_request(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        tool_names = self._check_tools(body)
        text = self._render_chat(body)
        prompts = [self._adjust_prompt(body, self._encode_prompt(text))]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        parsing = ChatParsing(self.reasoning_parser, self.reasoning_parser and prompt_opens_reasoning(text),
                              tool_names)
        if body.heavy_thinking is not None:
            return await self._heavy_thinking(body, prompts[0], logprobs, request, parsing)
        processors = await self._processors(body, self._guide_regex(body), parsing)
        base, stream = await self._start(body, prompts, body.completion_limit, logprobs, "chatcmpl", processors)
        fmt = ChatFormat(self.model_name, self.token_text, body, base, prompts, parsing=parsing)
        if body.stream:
            return self._sse(stream, fmt)
        return await _unless_disconnected(request, self._collect(stream, fmt), stream)

    # -------------------------------------------------------- tools and constrained output

    def _check_tools(self, body: ChatCompletionRequest) -> Optional[tuple[str, ...]]:
        """Validate tools / tool_choice; the function names to parse calls of (None: don't)."""
        names = []
        for i, tool in enumerate(body.tools or ()):
            function = tool.get("function")
            if tool.get("type", "function") != "function" or not isinstance(function, dict) \
                    or not isinstance(function.get("name"), str) or not function["name"]:
                raise APIError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": "
                               f"...}}}}; got {json.dumps(tool)[:200]}", param=f"tools[{i}]")
            if not isinstance(function.get("parameters", {}), dict):
                raise APIError(f"tools[{i}].function.parameters must be a JSON schema object",
                               param=f"tools[{i}].function.parameters")
            names.append(function["name"])
        choice = body.tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if choice.get("type") != "function" or not isinstance(name, str):
                raise APIError(f"tool_choice must be 'none', 'auto', 'required' or {{\"type\": \"function\", "
                               f"\"function\": {{\"name\": ...}}}}; got {json.dumps(choice)[:200]}",
                               param="tool_choice")
            if name not in names:
                raise APIError(f"tool_choice names function {name!r}, which is not in 'tools' "
                               f"({names or 'none given'}).", param="tool_choice")
        elif choice not in (None, "none", "auto", "required"):
            raise APIError(f"tool_choice must be 'none', 'auto', 'required' or a named function; got "
                           f"{choice!r}", param="tool_choice")
        elif choice == "required" and not names:
            raise APIError("tool_choice 'required' needs 'tools'.", param="tool_choice")
        return tuple(names) if names and choice != "none" else None

    def _guide_regex(self, body) -> Optional[tuple[str, str]]:
        """(regex the output must match, the request field it comes from), or None."""
        try:
            if body.guided_json is not None:
                schema = json.loads(body.guided_json) if isinstance(body.guided_json, str) else body.guided_json
                return json_schema_regex(schema), "guided_json"
            if body.guided_regex is not None:
                return body.guided_regex, "guided_regex"
            if body.guided_choice is not None:
                return choice_regex(body.guided_choice), "guided_choice"
            if not isinstance(body, ChatCompletionRequest):
                return None
            if body.json_response:
                fmt = body.response_format
                if fmt["type"] == "json_object":
                    return json_schema_regex(None), "response_format"
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
                    raise GrammarError("response_format json_schema needs {\"json_schema\": {\"name\": ..., "
                                       "\"schema\": {...}}}")
                return json_schema_regex(spec.get("schema", {})), "response_format"
            if body.forced_tools:
                name = body.tool_choice["function"]["name"] if isinstance(body.tool_choice, dict) else None
                parallel = name is None and body.parallel_tool_calls is not False
                return tool_call_regex(body.tools, name, parallel), "tool_choice"
        except (GrammarError, ValueError) as err:
            field = "response_format" if isinstance(body, ChatCompletionRequest) and body.json_response else (
                "tool_choice" if isinstance(body, ChatCompletionRequest) and body.forced_tools else "guided_json")
            raise APIError(f"{field}: {err}", param=field) from None
        return None

    async def _processors(self, body, guide: Optional[tuple[str, str]],
                          parsing: Optional[ChatParsing] = None) -> Optional[Callable[[], Any]]:
        """A factory of one logits processor per sequence (None: no processor). With `parsing`
        of a chat reply whose reasoning is parsed, the constraint starts after reasoning."""
        bias = None
        if body.logit_bias or body.allowed_token_ids is not None:
            try:
                values = parse_logit_bias(body.logit_bias or {}, self.vocab_size)
            except ValueError as err:
                raise APIError(str(err), param="logit_bias") from None
            if body.allowed_token_ids is not None:
                if not body.allowed_token_ids:
                    raise APIError("'allowed_token_ids' is empty.", param="allowed_token_ids")
                self._check_ids(body.allowed_token_ids, "allowed_token_ids")
            bias = LogitBias(self.vocab_size, values, body.allowed_token_ids)
        index = None
        if guide is not None:
            regex, field = guide
            try:  # a build can take seconds for a large vocabulary: on the compiler's threads
                index = await asyncio.wrap_future(self.grammars.index_future(regex))
            except GrammarError as err:
                raise APIError(f"{field}: {err}", param=field) from None
        if bias is None and index is None:
            return None
        reasons = parsing is not None and parsing.reasoning
        gate = (self.token_text, parsing.starts_in_reasoning, *self.think_ids) if reasons else None
        return lambda: combine([bias, guided_processor(index, self.vocab_size, gate)])

    def _adjust_prompt(self, body, ids: list[int]) -> list[int]:
        """vLLM's add_special_tokens (start with bos) and truncate_prompt_tokens (keep the last k)."""
        if body.add_special_tokens and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        if body.truncate_prompt_tokens is not None:
            ids = ids[-body.truncate_prompt_tokens:]
        return ids

    # -------------------------------------------------------- Heavy Thinking
    # `heavy_thinking: {num_traces, temperature, top_p, trace_max_tokens, summary_max_tokens,
    # summary_temperature, return_traces, answer_only}` on /v1/chat/completions: N traces of the
    # conversation, then one summary request (lcjax/serve/heavy_thinking.py, which also says how
    # the summary prompt is budgeted to fit max_model_len). The summary is the answer, parsed like
    # any chat output (reasoning, tools, response_format and logit_bias apply to it); trace tokens
    # count as usage.completion_tokens_details.reasoning_tokens. With stream=true the role chunk
    # goes out at once, the traces are not streamed (N independent samples would interleave into
    # one unreadable reasoning_content), then the summary streams. n=1 and no logprobs (400
    # otherwise); return_traces only without streaming.
    async def _heavy_thinking(self, body: ChatCompletionRequest, prompt_ids: list[int],
                              logprobs: Optional[int], request: Request, parsing: ChatParsing):
        try:
            from lcjax.serve import heavy_thinking
        except ImportError:
            raise APIError("heavy_thinking is not available in this build "
                           "(lcjax.serve.heavy_thinking is missing).", param="heavy_thinking",
                           code="unsupported") from None
        options = body.heavy_thinking.model_dump(exclude_none=True)
        for field, bad in (("n", body.n != 1), ("logprobs", logprobs is not None),
                           ("stream", body.stream and options.get("return_traces"))):
            if bad:
                raise APIError(f"heavy_thinking does not support '{field}'"
                               f"{' with return_traces' if field == 'stream' else ''}.", param=field,
                               code="unsupported")
        params = self._sampling_params(body, len(prompt_ids), body.completion_limit, None, body.seed)
        users = [m for m in body.messages if m.role == "user"]
        problem = users[-1].text() if users else body.messages[-1].text()
        kwargs = body.chat_template_kwargs

        def encode(text: str) -> list[int]:
            message = type(body.messages[0])(role="user", content=text)
            return self._encode_prompt(self._render([message], True, kwargs))

        try:
            config = heavy_thinking.HeavyThinkingConfig(**options)
            fixed = heavy_thinking.summary_fixed_tokens(problem, config.num_traces, encode)
            params, config = heavy_thinking.budget(params, config, len(prompt_ids), self.max_model_len, fixed,
                                                   max_tokens_given=body.completion_limit is not None)
        except ValueError as err:
            field = next((f for f in sorted(options, key=len, reverse=True) if f in str(err)),
                         "max_tokens" if "max_tokens" in str(err) else None)
            param = "heavy_thinking" if field is None else (
                field if field == "max_tokens" else f"heavy_thinking.{field}")
            raise APIError(str(err), param=param,
                           code="context_length_exceeded" if "max_model_len" in str(err) else None) from None
        processors = await self._processors(body, self._guide_regex(body), parsing)
        base = f"chatcmpl-{uuid.uuid4().hex}"
        fmt = ChatFormat(self.model_name, self.token_text, body, base, [[]], parsing=parsing)
        state: dict[str, Any] = {}

        async def start_summary() -> RequestStream:
            traces, permutation, summary_params = await heavy_thinking.run_traces_async(
                self.engine.generate, prompt_ids, params, config)
            text, ids = heavy_thinking.fit_summary_prompt(
                problem, [t.text for t in traces], config, permutation, encode, self.tokenizer,
                self.max_model_len - summary_params.max_tokens)
            processor = processors() if processors is not None else None
            stream = await self.engine.add_requests([(ids, summary_params, f"{base}-0", processor)])
            state.update(stream=stream, traces=traces, summary_prompt=text)
            trace_tokens = sum(t.num_generated_tokens for t in traces)
            fmt.prompts = [ids]
            fmt.extra_prompt_tokens = len(prompt_ids)
            fmt.extra_completion_tokens = fmt.reasoning_tokens = trace_tokens
            return stream

        def close() -> None:
            if "stream" in state:
                state["stream"].close()

        if body.stream:
            async def events() -> AsyncIterator[str]:
                try:
                    for chunk in fmt.opening_chunks():
                        yield sse(chunk)
                    async for output in await start_summary():
                        yield sse(fmt.chunk(output))
                    for chunk in fmt.closing_chunks():
                        yield sse(chunk)
                except (EngineError, heavy_thinking.HeavyThinkingAborted) as err:
                    yield sse(error_body(str(err), "internal_error"))
                yield "data: [DONE]\n\n"

            return _ClosingStreamingResponse(events(), on_close=close, media_type="text/event-stream",
                                             headers=_SSE_HEADERS)

        async def work() -> dict:
            try:
                response = await self._collect(await start_summary(), fmt)
            finally:
                close()
            if config.return_traces:
                response["heavy_thinking"] = {
                    "traces": [{"text": t.text, "finish_reason": t.finish_reason,
                                "completion_tokens": t.num_generated_tokens} for t in state["traces"]],
                    "summary_prompt": state["summary_prompt"]}
            return response

        try:
            return await _unless_disconnected(request, work())
        except heavy_thinking.HeavyThinkingAborted as err:
            raise EngineShutdown(str(err)) from None

    # -------------------------------------------------------- request plumbing

    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise APIError(f"The model `{model}` does not exist (this server serves "
                           f"`{self.model_name}`).", 404, param="model", code="model_not_found")

    def _check_request(self, body) -> None:
        self._check_model(body.model)
        _check_text(body.model_dump(exclude_none=True))
        unsupported = body.unsupported()
        if unsupported is not None:
            field, why = unsupported
            raise APIError(f"'{field}' is not supported by this server: {why}.", param=field, code="unsupported")

    def _check_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(f"'{param}' holds token id {bad[0]} outside [0, {self.vocab_size}).", param=param)

    def _encode_prompt(self, text: str) -> list[int]:
        # An empty prompt means "generate from nothing": start from bos, as a trained model expects.
        return self.tokenizer.encode(text) or [self.bos_id]

    def _completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self._encode_prompt(prompt)]
        if not prompt:
            raise APIError("'prompt' is an empty list.", param="prompt")
        if isinstance(prompt[0], int):
            prompts = [list(prompt)]
        elif isinstance(prompt[0], str):
            prompts = [self._encode_prompt(p) for p in prompt]
        else:
            prompts = [list(p) for p in prompt]
        for ids in prompts:
            if not ids:
                raise APIError("'prompt' holds an empty token list.", param="prompt")
            self._check_ids(ids, "prompt")
        return prompts

    def _render_chat(self, body) -> str:
        """The prompt text of a chat (or chat /tokenize) request. continue_final_message (vLLM):
        no generation prompt, and the text ends right after the last message's content."""
        if not body.continue_final_message:
            return self._render(body.messages, body.add_generation_prompt, body.chat_template_kwargs, body.tools)
        if body.add_generation_prompt and "add_generation_prompt" in body.model_fields_set:
            raise APIError("'continue_final_message' and 'add_generation_prompt' cannot both be true.",
                           param="continue_final_message")
        last = body.messages[-1].text()
        text = self._render(body.messages, False, body.chat_template_kwargs, body.tools)
        at = text.rfind(last) if last else -1
        if at < 0:
            raise APIError("continue_final_message: the chat template does not show the last message's "
                           "content verbatim.", param="continue_final_message")
        return text[:at + len(last)]

    def _render(self, messages, add_generation_prompt: bool, kwargs: Optional[dict],
                tools: Optional[list] = None) -> str:
        dicts = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in messages]
        return self.template.render(dicts, add_generation_prompt, kwargs, tools)

    def _sampling_params(self, body, prompt_len: int, max_tokens: Optional[int],
                         logprobs: Optional[int], seed: Optional[int]) -> SamplingParams:
        if prompt_len >= self.max_model_len:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens; the "
                           f"prompt has {prompt_len} tokens, leaving no room for a completion.",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = self.max_model_len - prompt_len
        elif prompt_len + max_tokens > self.max_model_len:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. "
                           f"However, you requested {prompt_len + max_tokens} tokens ({prompt_len} "
                           f"in the prompt, {max_tokens} for the completion).", param="max_tokens",
                           code="context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        fields = dict(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                      top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                      presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                      stop=stop, stop_token_ids=tuple(body.stop_token_ids or ()),
                      ignore_eos=body.ignore_eos, seed=seed, logprobs=logprobs,
                      min_tokens=body.min_tokens)
        try:
            params = SamplingParams.create(**{k: v for k, v in fields.items() if v is not None})
            params.validate(self.vocab_size)
        except (TypeError, ValueError) as err:
            raise APIError(str(err), param=_named_field(str(err), fields)) from None
        return params

    async def _start(self, body, prompts: list[list[int]], max_tokens: Optional[int],
                     logprobs: Optional[int], prefix: str,
                     processors: Optional[Callable[[], Any]] = None) -> tuple[str, RequestStream]:
        """Fan out len(prompts) * n engine requests (seed + i for choice i) on one stream.

        processors: makes each request's logits processor (they keep per-sequence state).
        Returns the response id and the stream; engine request ids are `<id>-<choice index>`."""
        base = f"{prefix}-{uuid.uuid4().hex}"
        requests = []
        for p, ids in enumerate(prompts):
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i
                params = self._sampling_params(body, len(ids), max_tokens, logprobs, seed)
                processor = processors() if processors is not None else None
                requests.append((ids, params, f"{base}-{p * body.n + i}", processor))
        return base, await self.engine.add_requests(requests)

    async def _collect(self, stream: RequestStream, fmt: ResponseFormat) -> dict:
        async for output in stream:
            fmt.add(output)
        return fmt.response()

    def _sse(self, stream: RequestStream, fmt: ResponseFormat) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                for chunk in fmt.opening_chunks():
                    yield sse(chunk)
                async for output in stream:
                    yield sse(fmt.chunk(output))
                for chunk in fmt.closing_chunks():
                    yield sse(chunk)
            except EngineError as err:
                yield sse(error_body(str(err), "internal_error"))
            yield "data: [DONE]\n\n"

        return _ClosingStreamingResponse(events(), on_close=stream.close, media_type="text/event-stream",
                                         headers=_SSE_HEADERS)
