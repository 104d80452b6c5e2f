"""OpenAI-schema request bodies (pydantic) and the OpenAI error object.

Request models forbid unknown fields (a typo such as `temprature` is a 400, not silently
ignored) but declare every field the official `openai` client sends for these endpoints, plus
vLLM's top-level extras (sampling: `top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`,
`ignore_eos`, `min_tokens`, `allowed_token_ids`; output: `include_stop_str_in_output`,
`add_special_tokens`, `skip_special_tokens`, `spaces_between_special_tokens`,
`truncate_prompt_tokens`; guided decoding: `guided_json`, `guided_regex`, `guided_choice`;
chat: `add_generation_prompt`, `continue_final_message`, `chat_template_kwargs`).
A declared field set to a value we do not implement is rejected by `unsupported()` with a 400
naming the field and saying why, never accepted and ignored. Response bodies are plain dicts
built in `responses.py`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 128  # choices per request: n fans out into n engine requests
MAX_LOGPROBS = 20  # OpenAI's bound for logprobs / top_logprobs


class APIError(Exception):
    """An error that becomes `{"error": {...}}` with HTTP `status`."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class HeavyThinking(_Strict):
    """Heavy Thinking mode (several reasoning traces, then a summary); see api.py's hook.
    Unset fields take HeavyThinkingConfig's defaults (lcjax/serve/heavy_thinking.py)."""

    num_traces: Optional[int] = Field(None, ge=1, le=64)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    trace_max_tokens: Optional[int] = Field(None, ge=1)
    summary_max_tokens: Optional[int] = Field(None, ge=1)
    summary_temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    return_traces: Optional[bool] = None
    answer_only: Optional[bool] = None


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # vLLM extras (the openai client sends them through `extra_body`)
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    allowed_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    add_special_tokens: Optional[bool] = None  # True: start the prompt with bos
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = Field(None, ge=1)
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    priority: int = 0
    use_beam_search: bool = False
    prompt_logprobs: Optional[int] = None

    def unsupported(self) -> Optional[tuple[str, str]]:
        """(field, why) for a field set to a value this server does not implement, or None."""
        if not self.skip_special_tokens:
            return "skip_special_tokens", "special tokens are always left out of the text"
        if not self.spaces_between_special_tokens:
            return "spaces_between_special_tokens", "special tokens are always left out of the text"
        if self.priority:
            return "priority", "the scheduler is first-come first-served"
        if self.use_beam_search:
            return "use_beam_search", "beam search is not implemented (sample with n instead)"
        if self.prompt_logprobs is not None:
            return "prompt_logprobs", "prompt log-probabilities are not computed"
        if sum(x is not None for x in (self.guided_json, self.guided_regex, self.guided_choice)) > 1:
            return "guided_json", "give at most one of guided_json, guided_regex, guided_choice"
        return None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> Optional[tuple[str, str]]:
        if self.echo and self.logprobs is not None:
            return "echo", ("echo with logprobs needs the prompt's log-probabilities, which this "
                            "server does not compute (echo alone is supported)")
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", ("best_of > n is not supported (like vLLM's V1 engine): request n "
                               "samples with logprobs and rank them client-side")
        if self.suffix:
            return "suffix", ("suffix needs a fill-in-the-middle (insertion) model; LongCat-Flash "
                              "generates left to right only")
        return super().unsupported()


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; extra keys (tool_calls, ...) pass through to the chat template."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    # vLLM extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the reply continues the last (assistant) message
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # lcjax extra: see api.py `_heavy_thinking`
    heavy_thinking: Optional[HeavyThinking] = None

    def unsupported(self) -> Optional[tuple[str, str]]:
        if self.response_format and self.response_format.get("type") not in ("text", "json_object", "json_schema"):
            return "response_format", (f"type {self.response_format.get('type')!r} is not one of "
                                       "'text', 'json_object', 'json_schema'")
        constraints = [name for name, on in (("response_format", self.json_response),
                                             ("guided_json/guided_regex/guided_choice",
                                              self.guided_json or self.guided_regex or self.guided_choice),
                                             ("tool_choice", self.forced_tools)) if on]
        if len(constraints) > 1:
            return "response_format", f"{' and '.join(constraints)} both constrain the output; give one"
        return super().unsupported()

    @property
    def json_response(self) -> bool:
        return bool(self.response_format) and self.response_format.get("type") in ("json_object", "json_schema")

    @property
    def forced_tools(self) -> bool:
        """tool_choice asks for a call ("required" or a named function)."""
        return bool(self.tools) and (self.tool_choice == "required" or isinstance(self.tool_choice, dict))

    @property
    def completion_limit(self) -> Optional[int]:
        """`max_completion_tokens` (current OpenAI name) wins over the deprecated `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Strict):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[dict[str, Any]]] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: list[int]
