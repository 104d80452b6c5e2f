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
plain text, so a weak model's broken call never fails the request. A call's `arguments` string
is the arguments object exactly as the model wrote it (so a streamed call's fragments add up to
the same string as the whole reply's).

`ToolCallParser` works on a stream of content pieces. Whole (`stream=False`), it emits each
call once its block closes. Streaming, it emits calls as vLLM streams them: a call's start
(index, id, name) as soon as the block's head `{"name": "<declared name>", "arguments": {` is
complete, then fragments of the arguments object as they arrive (a possible partial closing
tag is held back). A block whose head has another shape (arguments first, extra keys first,
arguments written as a string) is emitted whole at its end, or as content when malformed. A
stream cannot take back what it sent: a started call whose block then turns out broken (cut
off by max_tokens, invalid JSON inside the arguments) keeps the arguments text it streamed.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Iterable, Optional, Union

from lcjax.serve.reasoning import held_suffix
from lcjax.serve.structured import TOOL_CALL_END, TOOL_CALL_START

# Plain content text, or a call: whole {"id", "name", "arguments"}; streaming, a start
# {"index", "id", "name"} or an arguments fragment {"index", "arguments"}.
Event = Union[str, dict]

# The head of a block in the model card's key order, up to where the arguments value starts.
_HEAD_WINDOW = 512  # characters a head may take (OpenAI function names have at most 64)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(arguments|parameters)"\s*:\s*')


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
    key = "arguments" if "arguments" in value else "parameters"
    arguments = value.get(key, {})
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            return None
    elif isinstance(arguments, dict):
        arguments = _written_arguments(body, key) or json.dumps(arguments, ensure_ascii=False)
    else:
        return None
    return {"name": value["name"], "arguments": arguments}


def _written_arguments(body: str, key: str) -> Optional[str]:
    """The arguments object's text as written, when the body starts with the usual head."""
    head = _HEAD.match(body)
    if head is None or head.group(2) != key or body[head.end():head.end() + 1] != "{":
        return None
    _, end = json.JSONDecoder().raw_decode(body, head.end())
    return body[head.end():end]


class _ObjectScanner:
    """Finds where a JSON object ends, one character at a time (strings and escapes aware)."""

    def __init__(self):
        self.depth, self.in_string, self.escape = 0, False, False

    def step(self, ch: str) -> bool:
        """Take one character; True when it closes the object."""
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


class ToolCallParser:
    """Turns a stream of content text into content pieces and tool calls (see the module
    docstring for `stream`).

    names: the request's function names (calls to others are content); None accepts any name.
    """

    def __init__(self, names: Optional[Iterable[str]] = None, stream: bool = False):
        self.names = None if names is None else set(names)
        self.stream = stream
        self.inside = False
        self._buffer = ""
        self.calls: list[dict] = []
        self._started: Optional[dict] = None  # the streamed call of the open block
        self._scanned = 0  # body characters read as the started call's arguments
        self._scanner = _ObjectScanner()
        self._closed_object = False
        self._after_call = False

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
                self._started, self._scanned = None, 0
                self._scanner, self._closed_object = _ObjectScanner(), False
            else:
                at = self._buffer.find(TOOL_CALL_END)
                if at < 0:
                    if self.stream:
                        self._stream_block(events, self._buffer, complete=False)
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

    def _stream_block(self, events: list[Event], body: str, complete: bool) -> None:
        """Start the open block's call once its head is complete; then emit what has arrived of
        its arguments object (all of it when the block is `complete`)."""
        if self._started is None:
            if len(body) > _HEAD_WINDOW:
                return  # not the usual head: the block is parsed whole at its end
            head = _HEAD.match(body)
            if head is None or body[head.end():head.end() + 1] != "{":
                return
            try:
                name = json.loads(f'"{head.group(1)}"')
            except ValueError:
                return
            if self.names is not None and name not in self.names:
                return
            self._started = {"id": _call_id(), "name": name, "arguments": ""}
            self._scanned = head.end()
            self.calls.append(self._started)
            self._after_call = True
            events.append({"index": len(self.calls) - 1, "id": self._started["id"], "name": name})
        if self._closed_object:
            return
        limit = len(body) if complete else len(body) - held_suffix(body, TOOL_CALL_END)
        start = end = self._scanned
        while end < limit and not self._closed_object:
            self._closed_object = self._scanner.step(body[end])
            end += 1
        if end > start:
            self._scanned = end
            self._started["arguments"] += body[start:end]
            events.append({"index": len(self.calls) - 1, "arguments": body[start:end]})

    def _block(self, events: list[Event], body: str, closed: bool) -> None:
        if self._started is not None:  # announced: its arguments are what was streamed
            self._stream_block(events, body, complete=True)
            return
        call = parse_call(body, self.names)
        if call is None:
            self._content(events, TOOL_CALL_START + body + (TOOL_CALL_END if closed else ""))
            return
        call = {"id": _call_id(), **call}
        self.calls.append(call)
        self._after_call = True
        if self.stream:
            index = len(self.calls) - 1
            events += [{"index": index, "id": call["id"], "name": call["name"]},
                       {"index": index, "arguments": call["arguments"]}]
        else:
            events.append(call)

    def _content(self, events: list[Event], text: str) -> None:
        # Whitespace right after a call (the separator of calls) is not content.
        if self._after_call:
            text = text.lstrip()
        if text:
            events.append(text)
            self._after_call = False


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str, names: Optional[Iterable[str]] = None) -> tuple[Optional[str], list[dict]]:
    """(content or None, calls) of a whole output; content keeps the text outside the calls."""
    parser = ToolCallParser(names)
    events = parser.feed(text) + parser.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls = [e for e in events if isinstance(e, dict)]
    if calls:
        content = content.strip()
    return (content or None) if calls else content, calls


def openai_tool_call(call: dict) -> dict[str, Any]:
    """A whole parsed call in OpenAI's `tool_calls` shape."""
    return {"id": call["id"], "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]}}


def openai_tool_call_deltas(events: list[dict]) -> list[dict[str, Any]]:
    """Streamed call events as OpenAI `delta.tool_calls` entries: a start carries index, id,
    type and the name (arguments ""); fragments carry only arguments (adjacent fragments of one
    call are joined)."""
    out: list[dict[str, Any]] = []
    for event in events:
        if "id" in event:
            out.append({"index": event["index"], "id": event["id"], "type": "function",
                        "function": {"name": event["name"], "arguments": ""}})
        elif out and out[-1]["index"] == event["index"] and "id" not in out[-1]:
            out[-1]["function"]["arguments"] += event["arguments"]
        else:
            out.append({"index": event["index"], "function": {"arguments": event["arguments"]}})
    return out
