"""Tool calls in the LongCat format, parsed out of generated text.

The format (LongCat-Flash-Chat model card, "Tool Calling Format"; read the same way by vLLM's
`LongcatFlashToolParser`, a Hermes-2-Pro parser with LongCat's tags) is one block per call:

    <longcat_tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </longcat_tool_call>

The body is one JSON object with a string `name` and an `arguments` object (missing = {});
whitespace around it is ignored; several blocks are several (parallel) calls. Like vLLM, an
unclosed final block (the output ended inside it) is parsed too. A block that is not valid JSON,
has no string name, or names a function the request did not declare stays in `content` as
plain text, so a weak model's broken call never fails the request.

`ToolCallParser` works on a stream of content pieces and emits each call whole once its block
closes (OpenAI clients accept a call's arguments in one delta).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Iterable, Optional, Union

from lcjax.serve.reasoning import held_suffix
from lcjax.serve.structured import TOOL_CALL_END, TOOL_CALL_START

Event = Union[str, dict]  # plain content text, or {"name", "arguments"} (arguments: a JSON string)


def parse_call(body: str, names: Optional[Iterable[str]] = None) -> Optional[dict]:
    """The call in one block's body, or None when it is malformed."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if names is not None and value["name"] not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            return None
    elif isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    else:
        return None
    return {"name": value["name"], "arguments": arguments}


class ToolCallParser:
    """Turns a stream of content text into content pieces and whole tool calls.

    names: the request's function names (calls to others are content); None accepts any name.
    """

    def __init__(self, names: Optional[Iterable[str]] = None):
        self.names = None if names is None else set(names)
        self.inside = False
        self._buffer = ""
        self.calls: list[dict] = []

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while True:
            if not self.inside:
                at = self._buffer.find(TOOL_CALL_START)
                if at < 0:
                    keep = held_suffix(self._buffer, TOOL_CALL_START)
                    self._content(events, self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return events
                self._content(events, self._buffer[:at])
                self._buffer = self._buffer[at + len(TOOL_CALL_START):]
                self.inside = True
            else:
                at = self._buffer.find(TOOL_CALL_END)
                if at < 0:
                    return events
                body, self._buffer = self._buffer[:at], self._buffer[at + len(TOOL_CALL_END):]
                self.inside = False
                self._block(events, body, closed=True)

    def finish(self) -> list[Event]:
        events: list[Event] = []
        rest, self._buffer = self._buffer, ""
        if self.inside:
            self.inside = False
            self._block(events, rest, closed=False)
        else:
            self._content(events, rest)
        return events

    def _block(self, events: list[Event], body: str, closed: bool) -> None:
        call = parse_call(body, self.names)
        if call is None:
            self._content(events, TOOL_CALL_START + body + (TOOL_CALL_END if closed else ""))
        else:
            call = {"id": f"call_{uuid.uuid4().hex[:24]}", **call}
            self.calls.append(call)
            events.append(call)

    def _content(self, events: list[Event], text: str) -> None:
        # Whitespace between and after calls (their separators) is not content.
        if text and not (self.calls and not text.strip()):
            events.append(text)


def parse_tool_calls(text: str, names: Optional[Iterable[str]] = None) -> tuple[Optional[str], list[dict]]:
    """(content or None, calls) of a whole output; content keeps the text outside the calls."""
    parser = ToolCallParser(names)
    events = parser.feed(text) + parser.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls = [e for e in events if isinstance(e, dict)]
    if calls:
        content = content.strip()
    return (content or None) if calls else content, calls


def openai_tool_call(call: dict, index: Optional[int] = None) -> dict[str, Any]:
    """A parsed call in OpenAI's `tool_calls` shape (with `index` for stream deltas)."""
    out = {"id": call["id"], "type": "function",
           "function": {"name": call["name"], "arguments": call["arguments"]}}
    return out if index is None else {"index": index, **out}
