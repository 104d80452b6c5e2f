"""Supervised fine-tuning data: chat conversations -> token ids + which tokens are trained.

Records are JSONL lines in the OpenAI / Hugging Face layout:
    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str | null,
                   "tool_calls": [...], "tool_call_id": ..., ...}, ...],
     "tools": [...]}                                          # optional, OpenAI tool definitions
Each conversation is rendered with the serving chat template (an object with the
`lcjax.serve.chat_template.ChatTemplate.render` signature, passed in by the trainer) so a model is
trained on the very text the server will show it.

Which tokens are trained (the assistant spans), found by rendering prefixes:
    for each assistant message i,
        start_i = len(render(messages[:i],   add_generation_prompt=True))
        end_i   = len(render(messages[:i+1], add_generation_prompt=False))
    the span full[start_i:end_i] of full = render(messages, add_generation_prompt=False) is the
    assistant's turn: what the model must write after the server's generation prompt (content,
    tool calls, and the template's end-of-turn text). Each span is followed by the eos id, also
    trained, because the server stops on eos. A template that is not prefix-stable (a prefix
    render that is not a prefix of the next) raises ValueError naming the message.
Text outside the spans (system, user, tool turns, role headers) is context only. Each piece is
tokenized on its own, so a span's tokens decode to exactly its text.

As a token stream: `trained[t]` = 1 where token t is trained, i.e. where the loss at position
t - 1 (predicting token t) counts; `lcjax.data.packing.Chunk` turns it into `loss_mask`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

import grain
import numpy as np
from jaxtyping import Int

from lcjax.data.sources import JsonlFiles, json_record
from lcjax.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool", "developer")
_CONTENT_PART_TYPES = ("text",)
Conversation = dict  # {"messages": list[dict], "tools": list[dict] | None}
EMPTY: Conversation = {"messages": [], "tools": None}


@runtime_checkable
class Template(Protocol):
    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               extra: Optional[Mapping[str, Any]] = None,
               tools: Optional[Sequence[Mapping[str, Any]]] = None) -> str: ...


def messages_field(text_field: str) -> str:
    """The record key of the message list: `data.text_field`, "messages" while it is "text"."""
    return "messages" if text_field == "text" else text_field


def parse_conversation(raw: bytes, path: str, line: int, text_field: str) -> Conversation:
    """One JSONL line -> {"messages", "tools"}; ValueError `<path>:<line>: ...` when malformed."""
    field = messages_field(text_field)
    record = json_record(raw, path, line, field)
    messages = record[field]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{path}:{line}: {field!r} is {_describe(messages)}, expected a "
                         "non-empty list of messages")
    for i, m in enumerate(messages):
        _check_message(m, f"{path}:{line}: {field}[{i}]")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{path}:{line}: no assistant message: nothing to train on")
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"{path}:{line}: 'tools' is {_describe(tools)}, expected a list of objects")
    return {"messages": messages, "tools": tools or None}


def _describe(value) -> str:
    return "an empty list" if value == [] else f"{type(value).__name__} {str(value)[:40]!r}"


def _check_message(m, where: str) -> None:
    if not isinstance(m, dict):
        raise ValueError(f"{where}: is {_describe(m)}, expected an object with role and content")
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise ValueError(f"{where}: role={role!r}, expected one of {list(ROLES)}")
    content = m.get("content")
    if isinstance(content, list):  # OpenAI content parts: text only
        if not all(isinstance(p, dict) and p.get("type") in _CONTENT_PART_TYPES
                   and isinstance(p.get("text"), str) for p in content):
            raise ValueError(f"{where}: content parts must be {{'type': 'text', 'text': str}}")
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"{where}: content is {type(content).__name__}, expected a string")
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise ValueError(f"{where}: tool_calls must be a list on an assistant message")
        for j, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
                raise ValueError(f"{where}: tool_calls[{j}] has no function name")
    if content is None and not calls:
        raise ValueError(f"{where}: no content (and no tool_calls)")


def _plain(m: Mapping[str, Any]) -> Mapping[str, Any]:
    """The message with OpenAI text content parts joined into one string."""
    if isinstance(m.get("content"), list):
        return {**m, "content": "".join(p["text"] for p in m["content"])}
    return m


class ChatFiles(JsonlFiles):
    """One conversation per JSONL line, checked up front like JsonlFiles (file:line errors, or
    skipped and counted with data.skip_bad_records, a skipped record being an empty one)."""

    parse_record = staticmethod(parse_conversation)
    empty = EMPTY


def render_text(conversation: Conversation, template: Template) -> str:
    """The whole conversation as the template renders it (e.g. for training the tokenizer)."""
    if not conversation["messages"]:
        return ""
    messages = [_plain(m) for m in conversation["messages"]]
    return template.render(messages, add_generation_prompt=False, tools=conversation["tools"])


def assistant_spans(conversation: Conversation, template: Template) -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end) character spans of the assistant turns]) by the prefix rule in
    the module docstring."""
    messages = [_plain(m) for m in conversation["messages"]]
    tools = conversation["tools"]
    full = template.render(messages, add_generation_prompt=False, tools=tools)
    spans, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = template.render(messages[:i], add_generation_prompt=True, tools=tools)
        turn = template.render(messages[:i + 1], add_generation_prompt=False, tools=tools)
        if not (turn.startswith(head) and full.startswith(turn) and len(head) >= pos):
            raise ValueError(f"chat template is not prefix-stable at message {i} (assistant): "
                             "render(messages[:i], add_generation_prompt=True) must be a prefix of "
                             "render(messages[:i+1]) and that of the whole conversation")
        spans.append((len(head), len(turn)))
        pos = len(turn)
    return full, spans


def tokenize_conversation(conversation: Conversation, template: Template, tokenizer: Tokenizer
                          ) -> dict[str, Int[np.ndarray, "N"]]:
    """{"ids": int32 [N], "trained": int32 [N]}; 1 on the assistant spans' tokens and their eos."""
    if not conversation["messages"]:
        return {"ids": np.zeros(0, np.int32), "trained": np.zeros(0, np.int32)}
    full, spans = assistant_spans(conversation, template)
    ids, trained, pos = [], [], 0
    for start, end in spans:
        context = tokenizer.encode(full[pos:start])
        reply = tokenizer.encode(full[start:end]) + [tokenizer.eos_id]
        ids += context + reply
        trained += [0] * len(context) + [1] * len(reply)
        pos = end
    tail = tokenizer.encode(full[pos:])
    ids += tail
    trained += [0] * len(tail)
    return {"ids": np.asarray(ids, np.int32), "trained": np.asarray(trained, np.int32)}


class ChatTokenize(grain.transforms.Map):
    """Conversation -> {"ids", "trained"} int32 [N] (see tokenize_conversation)."""

    def __init__(self, tokenizer: Tokenizer, template: Template):
        self.tokenizer, self.template = tokenizer, template

    def map(self, conversation: Conversation) -> dict[str, np.ndarray]:
        return tokenize_conversation(conversation, self.template, self.tokenizer)

    def __getstate__(self):
        # Grain pickles transforms into worker processes; a compiled Jinja2 template does not
        # pickle, so a ChatTemplate travels as its source and tokens and is compiled again.
        state = dict(self.__dict__)
        t = self.template
        if hasattr(t, "source") and hasattr(t, "bos_token"):
            state["template"] = (type(t), t.source, t.bos_token, t.eos_token)
        return state

    def __setstate__(self, state):
        if isinstance(state["template"], tuple):
            cls, source, bos, eos = state["template"]
            state = {**state, "template": cls(source, bos_token=bos, eos_token=eos)}
        self.__dict__.update(state)
