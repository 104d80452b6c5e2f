"""OpenAI-schema request bodies (pydantic) and the OpenAI error object.

Request models forbid unknown fields (a typo such as `temprature` is a 400, not silently
ignored) but declare every field the official `openai` client sends for these endpoints, plus
vLLM's top-level extras (`top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`,
`min_tokens`). Fields we declare but do not implement are rejected by `unsupported()` with a 400
naming the field, never accepted and ignored. Response bodies are plain dicts built in `responses.py`.
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
    return_traces: Optional[bool] = None


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

    def unsupported(self) -> Optional[str]:
        """Name of a field set to a value this server does not implement, or None."""
        if self.logit_bias:
            return "logit_bias"
        return None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> Optional[str]:
        if self.echo:
            return "echo"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        if self.suffix:
            return "suffix"
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
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # lcjax extra: see api.py `_heavy_thinking`
    heavy_thinking: Optional[HeavyThinking] = None

    def unsupported(self) -> Optional[str]:
        if self.tools:
            return "tools"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format"
        return super().unsupported()

    @property
    def completion_limit(self) -> Optional[int]:
        """`max_completion_tokens` (current OpenAI name) wins over the deprecated `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Strict):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: list[int]
