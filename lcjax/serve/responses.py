"""OpenAI response bodies for /v1/completions and /v1/chat/completions, whole and as SSE chunks.

A format accumulates the engine outputs of one HTTP request (len(prompts) * n choices, engine
request ids `<id>-<choice index>`) and renders them: `response()` for a non-streaming reply;
`opening_chunks()`, `chunk(output)` per engine output and `closing_chunks()` for a stream (see
lcjax/serve/api.py for the stream's framing), each encoded by `sse()`.

Chat output is split as vLLM's parsers do (`ChatParsing`): `<longcat_think>` text goes to
`reasoning_content` (lcjax/serve/reasoning.py) and, when the request declared tools, LongCat
tool-call blocks become `tool_calls` (lcjax/serve/tool_parser.py); a choice that made calls and
stopped normally finishes with "tool_calls". In a stream a call arrives as vLLM sends it: a
delta with its index, id, type and name (arguments ""), then deltas of arguments fragments.

Completion logprobs list the sampled token among `top_logprobs` even when it is not in the top k
(so `logprobs=0` gives the sampled token alone), as vLLM does; chat `top_logprobs` are the k best.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable, Optional, Sequence, Union

from lcjax.serve.outputs import RequestOutput, TokenLogprob
from lcjax.serve.protocol import ChatCompletionRequest, CompletionRequest
from lcjax.serve.reasoning import ReasoningSplitter
from lcjax.serve.tool_parser import ToolCallParser, openai_tool_call, openai_tool_call_deltas


def sse(payload: dict) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclasses.dataclass(frozen=True)
class ChatParsing:
    """How chat output text is split. reasoning: separate `<longcat_think>` blocks;
    starts_in_reasoning: the prompt opened the block; tool_names: parse tool calls to these
    functions (None: tool calls are plain content)."""

    reasoning: bool = True
    starts_in_reasoning: bool = False
    tool_names: Optional[tuple[str, ...]] = None


class _ChatText:
    """One choice's text, split into reasoning, content and tool calls as it streams."""

    def __init__(self, parsing: ChatParsing, stream: bool = False):
        self.splitter = ReasoningSplitter(parsing.starts_in_reasoning) if parsing.reasoning else None
        self.tools = ToolCallParser(parsing.tool_names, stream) if parsing.tool_names is not None else None
        self.had_reasoning = parsing.reasoning and parsing.starts_in_reasoning

    def feed(self, text: str, final: bool) -> tuple[str, str, list[dict]]:
        """(reasoning, content, tool-call events) that `text` completes (see ToolCallParser)."""
        reasoning, content = self.splitter.feed(text) if self.splitter else ("", text)
        if final and self.splitter:
            more_r, more_c = self.splitter.finish()
            reasoning, content = reasoning + more_r, content + more_c
        if self.splitter and self.splitter.state != "before":
            self.had_reasoning = True
        if self.tools is None:
            return reasoning, content, []
        events = self.tools.feed(content) + (self.tools.finish() if final else [])
        return (reasoning, "".join(e for e in events if isinstance(e, str)),
                [e for e in events if isinstance(e, dict)])

    @property
    def num_calls(self) -> int:
        return len(self.tools.calls) if self.tools else 0


class Choice:
    """Accumulates one choice's outputs."""

    def __init__(self, index: int, prompt_ids: list[int]):
        self.index, self.prompt_ids = index, prompt_ids
        self.last: Optional[RequestOutput] = None
        self.logprobs: list[TokenLogprob] = []
        self.text_offset = 0
        self.started = False  # a stream chunk of this choice went out
        self.chat: Optional[_ChatText] = None


class ResponseFormat:
    """OpenAI response bodies for one request; subclasses give the completion/chat shapes."""

    object_name = chunk_object = ""

    def __init__(self, model_name: str, token_text: Callable[[int], str],
                 body: Union[CompletionRequest, ChatCompletionRequest], base: str,
                 prompts: list[list[int]]):
        self.model_name, self.token_text = model_name, token_text
        self.body, self.id, self.created = body, base, int(time.time())
        self.prompts = prompts
        # Heavy Thinking adds its traces' tokens (reasoning) and their prompt to the usage.
        self.extra_prompt_tokens = self.extra_completion_tokens = 0
        self.reasoning_tokens: Optional[int] = None
        self.choices = [Choice(p * body.n + i, ids) for p, ids in enumerate(prompts) for i in range(body.n)]
        self._by_id = {f"{base}-{c.index}": c for c in self.choices}
        options = body.stream_options
        self.include_usage = bool(options and options.include_usage)
        self.continuous_usage = bool(options and options.continuous_usage_stats)
        self._unfinished = len(self.choices)

    def add(self, output: RequestOutput) -> Choice:
        choice = self._by_id[output.request_id]
        choice.last = output
        if output.logprobs:
            choice.logprobs.extend(output.logprobs)
        return choice

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts) + self.extra_prompt_tokens
        completion = (sum(c.last.num_generated_tokens for c in self.choices if c.last is not None)
                      + self.extra_completion_tokens)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self.reasoning_tokens is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return usage

    def _stop_str(self, output: RequestOutput) -> str:
        """The stop string that ended `output`, when the request asked to keep it."""
        if (self.body.include_stop_str_in_output and output.finished and output.finish_reason == "stop"
                and isinstance(output.stop_reason, str)):
            return output.stop_reason
        return ""

    def delta_text(self, output: RequestOutput) -> str:
        return output.delta_text + self._stop_str(output)

    def full_text(self, output: Optional[RequestOutput]) -> str:
        return "" if output is None else output.text + self._stop_str(output)

    def _chunk(self, choices: list[dict], usage: Optional[dict] = None) -> dict:
        chunk = {"id": self.id, "object": self.chunk_object, "created": self.created,
                 "model": self.model_name, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def opening_chunks(self) -> list[dict]:
        return []

    def chunk(self, output: RequestOutput) -> dict:
        choice = self.add(output)
        body = self._choice_delta(choice, output)
        body["finish_reason"] = output.finish_reason if output.finished else None
        choice.started = True
        if output.finished:
            self._unfinished -= 1
        return self._chunk([body], self.usage() if self.continuous_usage else None)

    def closing_chunks(self) -> list[dict]:
        return [self._chunk([], self.usage())] if self.include_usage else []

    def response(self) -> dict:
        return {"id": self.id, "object": self.object_name, "created": self.created,
                "model": self.model_name,
                "choices": [self._choice_final(c) for c in self.choices], "usage": self.usage()}

    def _choice_delta(self, choice: Choice, output: RequestOutput) -> dict:
        raise NotImplementedError

    def _choice_final(self, choice: Choice) -> dict:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    """echo_texts: with `echo`, the prompt text of each prompt (it opens that prompt's choices)."""

    object_name = chunk_object = "text_completion"

    def __init__(self, *args, echo_texts: Optional[Sequence[str]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.echo_texts = echo_texts

    def _echo(self, choice: Choice) -> str:
        return self.echo_texts[choice.index // self.body.n] if self.echo_texts else ""

    def _logprobs(self, choice: Choice, entries: list[TokenLogprob]) -> Optional[dict]:
        if self.body.logprobs is None:
            return None
        text = self.token_text
        tokens, offsets = [], []
        for entry in entries:
            tokens.append(text(entry.token_id))
            offsets.append(choice.text_offset)
            choice.text_offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [self._top(e) for e in entries], "text_offset": offsets}

    def _top(self, entry: TokenLogprob) -> dict:
        top = list(entry.top)
        if all(t != entry.token_id for t, _ in top):
            top.append((entry.token_id, entry.logprob))  # the sampled token is always listed
        out: dict = {}
        for token, logprob in top:
            out.setdefault(self.token_text(token), logprob)  # two ids may decode alike
        return out

    def _choice_delta(self, choice: Choice, output: RequestOutput) -> dict:
        echo = "" if choice.started else self._echo(choice)
        return {"index": choice.index, "text": echo + self.delta_text(output),
                "logprobs": self._logprobs(choice, output.logprobs or []), "finish_reason": None}

    def _choice_final(self, choice: Choice) -> dict:
        last = choice.last
        return {"index": choice.index, "text": self._echo(choice) + self.full_text(last),
                "logprobs": self._logprobs(choice, choice.logprobs),
                "finish_reason": last.finish_reason if last else "abort"}


class ChatFormat(ResponseFormat):
    object_name, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, *args, parsing: ChatParsing = ChatParsing(), **kwargs):
        super().__init__(*args, **kwargs)
        self.parsing = parsing
        for choice in self.choices:
            choice.chat = _ChatText(parsing, stream=self.body.stream)

    def _finish_reason(self, choice: Choice, output: Optional[RequestOutput]) -> str:
        if output is None:
            return "abort"
        if output.finish_reason == "stop" and choice.chat.num_calls:
            return "tool_calls"
        return output.finish_reason

    def _logprobs(self, entries: list[TokenLogprob]) -> Optional[dict]:
        if not self.body.logprobs:
            return None
        text = self.token_text

        def item(token_id: int, logprob: float) -> dict:
            token = text(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def opening_chunks(self) -> list[dict]:
        return [self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]) for c in self.choices]

    def chunk(self, output: RequestOutput) -> dict:
        chunk = super().chunk(output)
        if output.finished:
            chunk["choices"][0]["finish_reason"] = self._finish_reason(self._by_id[output.request_id], output)
        return chunk

    def _choice_delta(self, choice: Choice, output: RequestOutput) -> dict:
        reasoning, content, calls = choice.chat.feed(self.delta_text(output), output.finished)
        delta: dict = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content or not (output.finished or reasoning or calls):
            delta["content"] = content
        if calls:
            delta["tool_calls"] = openai_tool_call_deltas(calls)
        return {"index": choice.index, "delta": delta, "logprobs": self._logprobs(output.logprobs or []),
                "finish_reason": None}

    def _choice_final(self, choice: Choice) -> dict:
        last = choice.last
        reasoning, content, calls = choice.chat.feed(self.full_text(last), final=True)
        message: dict = {"role": "assistant", "content": content}
        if calls:
            message["content"] = content.strip() or None
            message["tool_calls"] = [openai_tool_call(c) for c in calls]
        if self.parsing.reasoning:
            message["reasoning_content"] = reasoning if choice.chat.had_reasoning else None
        return {"index": choice.index, "message": message, "logprobs": self._logprobs(choice.logprobs),
                "finish_reason": self._finish_reason(choice, last)}
