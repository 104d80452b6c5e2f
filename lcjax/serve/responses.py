"""OpenAI response bodies for /v1/completions and /v1/chat/completions, whole and as SSE chunks.

A format accumulates the engine outputs of one HTTP request (len(prompts) * n choices, engine
request ids `<id>-<choice index>`) and renders them: `response()` for a non-streaming reply;
`opening_chunks()`, `chunk(output)` per engine output and `closing_chunks()` for a stream (see
lcjax/serve/api.py for the stream's framing), each encoded by `sse()`.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Optional, Union

from lcjax.serve.outputs import RequestOutput, TokenLogprob
from lcjax.serve.protocol import ChatCompletionRequest, CompletionRequest


def sse(payload: dict) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Choice:
    """Accumulates one choice's outputs."""

    def __init__(self, index: int, prompt_ids: list[int]):
        self.index, self.prompt_ids = index, prompt_ids
        self.last: Optional[RequestOutput] = None
        self.logprobs: list[TokenLogprob] = []
        self.text_offset = 0


class ResponseFormat:
    """OpenAI response bodies for one request; subclasses give the completion/chat shapes."""

    object_name = chunk_object = ""

    def __init__(self, model_name: str, token_text: Callable[[int], str],
                 body: Union[CompletionRequest, ChatCompletionRequest], base: str,
                 prompts: list[list[int]]):
        self.model_name, self.token_text = model_name, token_text
        self.body, self.id, self.created = body, base, int(time.time())
        self.prompts = prompts
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
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.last.num_generated_tokens for c in self.choices if c.last is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

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
        usage = None
        if output.finished:
            self._unfinished -= 1
            if self._unfinished == 0 and not self.include_usage:
                usage = self.usage()  # the last finish chunk carries usage when no usage chunk follows
        if self.continuous_usage:
            usage = self.usage()
        return self._chunk([body], usage)

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
    object_name = chunk_object = "text_completion"

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
                "top_logprobs": [{text(t): lp for t, lp in e.top} if e.top else None for e in entries],
                "text_offset": offsets}

    def _choice_delta(self, choice: Choice, output: RequestOutput) -> dict:
        return {"index": choice.index, "text": output.delta_text,
                "logprobs": self._logprobs(choice, output.logprobs or []), "finish_reason": None}

    def _choice_final(self, choice: Choice) -> dict:
        last = choice.last
        return {"index": choice.index, "text": last.text if last else "",
                "logprobs": self._logprobs(choice, choice.logprobs),
                "finish_reason": last.finish_reason if last else "abort"}


class ChatFormat(ResponseFormat):
    object_name, chunk_object = "chat.completion", "chat.completion.chunk"

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

    def _choice_delta(self, choice: Choice, output: RequestOutput) -> dict:
        delta = {"content": output.delta_text} if output.delta_text or not output.finished else {}
        return {"index": choice.index, "delta": delta, "logprobs": self._logprobs(output.logprobs or []),
                "finish_reason": None}

    def _choice_final(self, choice: Choice) -> dict:
        last = choice.last
        return {"index": choice.index, "message": {"role": "assistant", "content": last.text if last else ""},
                "logprobs": self._logprobs(choice.logprobs),
                "finish_reason": last.finish_reason if last else "abort"}
