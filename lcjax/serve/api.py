"""The OpenAI-compatible HTTP API (FastAPI) over an AsyncEngine.

Endpoints: POST /v1/completions, /v1/chat/completions (SSE when `stream=true`), /tokenize,
/detokenize; GET /v1/models, /health, /metrics (Prometheus), /version.

Every failure is an OpenAI error object `{"error": {"message", "type", "param", "code"}}`:
malformed JSON, schema violations and bad values (prompt too long, temperature < 0, ...) are
400; a wrong API key 401; an unknown model 404; an engine failure 500; shutting down 503. A
client that disconnects (streaming or not) has its requests aborted, freeing their KV pages.

Streaming follows OpenAI's chunk format: chat streams open with a `{"role": "assistant"}` delta
per choice; one chunk per engine output (several tokens under speculative decoding); each
choice's last chunk carries its finish_reason; with `stream_options.include_usage` a final
chunk with empty `choices` carries `usage` (otherwise the last finish chunk carries it); then
`data: [DONE]`. The bodies and chunks themselves are built in lcjax/serve/responses.py.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lcjax.serve.async_engine import AsyncEngine, EngineError, EngineShutdown, RequestStream
from lcjax.serve.chat_template import ChatTemplate, resolve_chat_template
from lcjax.serve.metrics import CONTENT_TYPE
from lcjax.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                  TokenizeRequest, error_body)
from lcjax.serve.responses import ChatFormat, CompletionFormat, ResponseFormat, sse
from lcjax.serve.sampling import SamplingParams

log = logging.getLogger("lcjax.serve")

_AUTH_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def build_app(async_engine: AsyncEngine, tokenizer: Any, model_name: str, api_key: Optional[str] = None,
              chat_template: Optional[ChatTemplate] = None, max_model_len: Optional[int] = None) -> FastAPI:
    """A FastAPI app serving `async_engine` under the name `model_name`.

    Args:
      tokenizer: encode(str) -> ids, decode(ids) -> str, eos_id; optional chat_template.
      api_key: when set, /v1/*, /tokenize and /detokenize need `Authorization: Bearer <key>`.
      chat_template: None = the tokenizer's template, else the built-in default.
      max_model_len: prompt + completion limit (default: the engine's).
    """
    serving = _Serving(async_engine, tokenizer, model_name,
                       chat_template or resolve_chat_template(None, tokenizer),
                       max_model_len or async_engine.engine.engine_config.max_model_len)
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


# ---------------------------------------------------------------- errors and auth


def _error(status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
           code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def _validation_message(err: dict) -> tuple[str, Optional[str]]:
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return f"Malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    if err.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if err.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    return f"Invalid value for '{param}': {err.get('msg')} (got {err.get('input')!r}).", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        message, param = _validation_message(errors[0]) if errors else ("Invalid request.", None)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return _error(400, message, param=param)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(ValueError)
    async def value_error(_: Request, exc: ValueError):
        return _error(400, str(exc))

    @app.exception_handler(EngineShutdown)
    async def shutting_down(_: Request, exc: EngineShutdown):
        return _error(503, str(exc), "service_unavailable")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404
                      else "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception):
        log.error("lcjax.serve: request failed", exc_info=exc)
        return _error(500, f"Internal server error: {type(exc).__name__}: {exc}", "internal_error")


def _install_auth(app: FastAPI, api_key: str) -> None:
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path.startswith(_AUTH_PREFIXES) and request.method != "OPTIONS":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(401, "Incorrect API key provided.", code="invalid_api_key")
        return await call_next(request)


# ---------------------------------------------------------------- the endpoints


class _Serving:
    def __init__(self, engine: AsyncEngine, tokenizer: Any, model_name: str, template: ChatTemplate,
                 max_model_len: int):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.template, self.max_model_len = template, max_model_len
        model_config = engine.engine.config.model
        self.vocab_size, self.bos_id = model_config.vocab_size, model_config.bos_token_id
        self.created = int(time.time())
        self.token_text = functools.lru_cache(maxsize=1 << 16)(lambda t: tokenizer.decode([t]))

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
        if (body.prompt is None) == (body.messages is None):
            raise APIError("Give exactly one of 'prompt' or 'messages'.", param="prompt")
        if body.prompt is not None:
            tokens = self.tokenizer.encode(body.prompt)
        else:
            tokens = self.tokenizer.encode(self._render(body.messages, body.add_generation_prompt, None))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.max_model_len}

    async def detokenize(self, body: DetokenizeRequest):
        self._check_model(body.model)
        self._check_ids(body.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_request(body)
        prompts = self._completion_prompts(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
        base, stream = await self._start(body, prompts, max_tokens, body.logprobs, "cmpl")
        fmt = CompletionFormat(self.model_name, self.token_text, body, base, prompts)
        if body.stream:
            return self._sse(stream, fmt)
        return await _unless_disconnected(request, self._collect(stream, fmt), stream)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._check_request(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        text = self._render(body.messages, body.add_generation_prompt, body.chat_template_kwargs)
        prompts = [self._encode_prompt(text)]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.heavy_thinking is not None:
            return await self._heavy_thinking(body, prompts[0], logprobs, request)
        base, stream = await self._start(body, prompts, body.completion_limit, logprobs, "chatcmpl")
        fmt = ChatFormat(self.model_name, self.token_text, body, base, prompts)
        if body.stream:
            return self._sse(stream, fmt)
        return await _unless_disconnected(request, self._collect(stream, fmt), stream)

    # -------------------------------------------------------- Heavy Thinking
    # `heavy_thinking: {"num_traces", "temperature", "return_traces"}` on /v1/chat/completions:
    # N traces of the conversation, then one summary request (lcjax/serve/heavy_thinking.py).
    # The summary is the answer; trace tokens count as usage.completion_tokens_details
    # .reasoning_tokens. Non-streaming, n=1, no logprobs (400 otherwise).
    async def _heavy_thinking(self, body: ChatCompletionRequest, prompt_ids: list[int],
                              logprobs: Optional[int], request: Request):
        try:
            from lcjax.serve import heavy_thinking
        except ImportError:
            raise APIError("heavy_thinking is not available in this build "
                           "(lcjax.serve.heavy_thinking is missing).", param="heavy_thinking",
                           code="unsupported") from None
        for field, bad in (("stream", body.stream), ("n", body.n != 1), ("logprobs", logprobs is not None)):
            if bad:
                raise APIError(f"heavy_thinking does not support '{field}' yet.", param=field, code="unsupported")
        config = heavy_thinking.HeavyThinkingConfig(**body.heavy_thinking.model_dump(exclude_none=True))
        params = self._sampling_params(body, len(prompt_ids), body.completion_limit, None, body.seed)
        users = [m for m in body.messages if m.role == "user"]
        problem = users[-1].text() if users else body.messages[-1].text()
        kwargs = body.chat_template_kwargs

        def render(text: str) -> list[int]:
            message = type(body.messages[0])(role="user", content=text)
            return self._encode_prompt(self._render([message], True, kwargs))

        work = heavy_thinking.heavy_think_async(self.engine.generate, prompt_ids, problem, params, config,
                                                tokenizer=self.tokenizer, render_summary_prompt=render)
        try:
            result = await _unless_disconnected(request, work)
        except heavy_thinking.HeavyThinkingAborted as err:
            raise EngineShutdown(str(err)) from None
        if not isinstance(result, heavy_thinking.HeavyThinkingResult):
            return result  # the client went away, or an engine error response
        summary = result.summary
        prompt = len(prompt_ids) + summary.num_prompt_tokens
        completion = result.trace_tokens + summary.num_generated_tokens
        response = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": summary.text},
                         "logprobs": None, "finish_reason": summary.finish_reason}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                      "completion_tokens_details": {"reasoning_tokens": result.trace_tokens}}}
        if config.return_traces:
            response["heavy_thinking"] = {
                "traces": [{"text": t.text, "finish_reason": t.finish_reason,
                            "completion_tokens": t.num_generated_tokens} for t in result.traces],
                "summary_prompt": result.summary_prompt}
        return response


    # -------------------------------------------------------- request plumbing

    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise APIError(f"The model `{model}` does not exist (this server serves "
                           f"`{self.model_name}`).", 404, param="model", code="model_not_found")

    def _check_request(self, body) -> None:
        self._check_model(body.model)
        field = body.unsupported()
        if field is not None:
            raise APIError(f"'{field}' is not supported by this server.", param=field, code="unsupported")

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

    def _render(self, messages, add_generation_prompt: bool, kwargs: Optional[dict]) -> str:
        dicts = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in messages]
        return self.template.render(dicts, add_generation_prompt, kwargs)

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
                     logprobs: Optional[int], prefix: str) -> tuple[str, RequestStream]:
        """Fan out len(prompts) * n engine requests (seed + i for choice i) on one stream.

        Returns the response id and the stream; engine request ids are `<id>-<choice index>`."""
        base = f"{prefix}-{uuid.uuid4().hex}"
        requests = []
        for p, ids in enumerate(prompts):
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i
                params = self._sampling_params(body, len(ids), max_tokens, logprobs, seed)
                requests.append((ids, params, f"{base}-{p * body.n + i}"))
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


class _ClosingStreamingResponse(StreamingResponse):
    """Runs `on_close` however the response ends, even if the body was never iterated (a
    client gone before the first byte), so the engine requests are always released."""

    def __init__(self, content, on_close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _unless_disconnected(request: Request, work, stream: Optional[RequestStream] = None):
    """Await `work`, cancelling it (and aborting `stream`) if the client disconnects first.

    Used for non-streaming responses, where Starlette itself does not watch the connection."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            if stream is not None:
                stream.close()
    if not task.done():  # the client left: let the work clean up (abort its requests), then stop
        await asyncio.wait({task})
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    try:
        return task.result()
    except EngineError as err:
        return _error(500, str(err), "internal_error")


def _named_field(message: str, fields: dict) -> Optional[str]:
    """The request field an error message names (SamplingParams errors name their field)."""
    names = sorted((k for k in fields if k in message), key=len, reverse=True)
    return names[0] if names else None


@functools.lru_cache(maxsize=1)
def _version() -> str:
    try:
        from importlib.metadata import version
        return version("lcjax")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0.1.0"
