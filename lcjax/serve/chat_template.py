"""Chat templates: messages -> prompt text, with Jinja2 in a sandbox (templates are untrusted).

Where the template comes from, first match wins:
  1. `--chat-template FILE` (a Jinja2 file);
  2. the tokenizer's own (`chat_template` in a Hugging Face `tokenizer_config.json`);
  3. DEFAULT_TEMPLATE below, for lcjax's own runs whose tokenizers have none:

      <|system|>            <- one block per message: <|role|>, newline, content, newline
      You are terse.
      <|user|>
      Hi
      <|assistant|>         <- with add_generation_prompt, the model continues from here

   With `tools`, a first `<|system|>` block lists them after a `Tools:` line, one JSON function
   object per line (a model trained on this layout learns the call format from the assistant
   turns); an assistant message's `tool_calls` follow its content as LongCat
   `<longcat_tool_call>{"name": ..., "arguments": {...}}</longcat_tool_call>` blocks (the format
   lcjax/serve/tool_parser.py reads back); a tool result is a `<|tool|>` block.

Templates see the Hugging Face variables: `messages` (dicts with role, content, ...; a tool
call's `function.arguments` is a dict, parsed from the OpenAI JSON string as vLLM does),
`tools` (the request's tool list or None), `add_generation_prompt`, `bos_token`, `eos_token`,
plus `raise_exception(msg)`, `strftime_now(fmt)` and any request `chat_template_kwargs`.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE = (
    "{% if tools %}<|system|>\nTools:\n"
    "{% for tool in tools %}{{ (tool['function'] if tool['function'] is defined else tool) | tojson }}"
    "{{ '\\n' }}{% endfor %}{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}"
    "<longcat_tool_call>{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "</longcat_tool_call>{% endfor %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template failed to render these messages (a 400 for the request)."""


def _tojson(value: Any, indent: Optional[int] = None, ensure_ascii: bool = False) -> str:
    # Hugging Face's variant: keeps non-ASCII text readable (jinja2's escapes it for HTML).
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _raise_exception(message: str):
    raise ChatTemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    # trim_blocks / lstrip_blocks: the settings Hugging Face renders its templates with.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTemplate:
    """A compiled template; `render` is cheap and thread-safe."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        try:
            self.template = _compile(source)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"chat template does not parse: {err} (line {err.lineno})") from err
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token

    @classmethod
    def from_file(cls, path: str | os.PathLike, **tokens: str) -> "ChatTemplate":
        with open(path) as f:
            return cls(f.read(), **tokens)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               extra: Optional[Mapping[str, Any]] = None,
               tools: Optional[Sequence[Mapping[str, Any]]] = None) -> str:
        """Prompt text; `extra` holds more template variables (a request's chat_template_kwargs),
        `tools` the request's tool definitions (OpenAI shape).

        Raises ChatTemplateError when the template rejects the messages.
        """
        variables = dict(extra or {})
        reserved = sorted(set(variables) & {"messages", "add_generation_prompt", "bos_token", "eos_token",
                                            "tools"})
        if reserved:
            raise ChatTemplateError(f"chat_template_kwargs may not set {reserved}")
        variables.update(messages=[_with_parsed_arguments(m) for m in messages],
                         add_generation_prompt=add_generation_prompt, tools=list(tools) if tools else None,
                         bos_token=self.bos_token, eos_token=self.eos_token)
        try:
            return self.template.render(**variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as err:  # includes SecurityError from the sandbox
            raise ChatTemplateError(f"chat template failed: {err}") from err


def _with_parsed_arguments(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """The message with each tool call's JSON-string `arguments` parsed to a dict (templates
    write arguments with `tojson`; a string that is not JSON is left as it is)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    parsed = []
    for call in calls:
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except ValueError:
                pass
        parsed.append({**call, "function": function})
    return {**message, "tool_calls": parsed}


def resolve_chat_template(path: Optional[str], tokenizer: Any) -> ChatTemplate:
    """The template for a server: FILE, else the tokenizer's `chat_template`, else the default."""
    tokens = {"bos_token": getattr(tokenizer, "bos_token", "") or "",
              "eos_token": getattr(tokenizer, "eos_token", "") or ""}
    if path:
        return ChatTemplate.from_file(path, **tokens)
    source = getattr(tokenizer, "chat_template", None)
    return ChatTemplate(source or DEFAULT_TEMPLATE, **tokens)
