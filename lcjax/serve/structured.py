"""Constrained decoding and logit bias as logits processors (host side).

A logits processor is `processor(generated_token_ids: list[int]) -> Optional[np.ndarray]`: the
engine calls it before each sampled token of its sequence and adds the float32 [vocab_size]
array it returns to the logits (-inf bans a token; None = no bias). Everything here builds
such processors:

- `LogitBias`: OpenAI `logit_bias` (and vLLM's `allowed_token_ids`), a fixed additive array;
- `GuidedDecoder`: output constrained to a regular expression (JSON schemas, tool calls, a
  choice list), with an outlines-core `Index` over the tokenizer's vocabulary. outlines-core
  was chosen because it fits JAX's host/device split: the index is built once per regex on the
  host (cached), and each step is one table lookup that writes a bitmask, so the jitted step
  only sees an ordinary additive bias. Its `build_regex_from_schema` turns a JSON schema into
  the regex (whitespace between tokens limited to one optional space, as it defaults to).
- `combine`: several processors summed.

Constrained output can still be cut short by `max_tokens` (finish_reason "length"); a complete
output always matches the regex. The constraint holds from the first generated token, so a
constrained reply has no `<longcat_think>` block (a thinking model answers without reasoning).
Needs the `outlines-core` package (only when a request asks for a constraint).
"""

from __future__ import annotations

import functools
import json
import re
import threading
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

LogitsProcessor = Callable[[list], Optional[np.ndarray]]

TOOL_CALL_START, TOOL_CALL_END = "<longcat_tool_call>", "</longcat_tool_call>"
LOGIT_BIAS_RANGE = 100.0  # OpenAI's bound on each logit_bias value


class GrammarError(ValueError):
    """A schema or regex the grammar compiler cannot turn into a token mask (a 400)."""


# ---------------------------------------------------------------- logit bias


class LogitBias:
    """A fixed additive bias: `{token id: bias}` (OpenAI semantics: -100 bans, +100 forces in
    practice) and optionally `allowed` ids (every other id banned, as vLLM's allowed_token_ids)."""

    def __init__(self, vocab_size: int, bias: Optional[Mapping[int, float]] = None,
                 allowed: Optional[Sequence[int]] = None):
        array = np.zeros(vocab_size, np.float32)
        if allowed is not None:
            array[:] = -np.inf
            array[np.asarray(list(allowed), np.int64)] = 0.0
        for token, value in (bias or {}).items():
            array[token] += value
        array.setflags(write=False)  # shared by every call: callers must not mutate it
        self.array = array

    def __call__(self, generated: list) -> np.ndarray:
        return self.array


def parse_logit_bias(raw: Mapping[str, Any], vocab_size: int) -> dict[int, float]:
    """OpenAI's `logit_bias` (JSON keys are token ids as strings) -> {id: bias}; ValueError
    naming the bad key or value."""
    out = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias key {key!r} is not a token id") from None
        if not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias key {key!r} is outside [0, {vocab_size})")
        if not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
            raise ValueError(f"logit_bias value {value!r} for token {key} is outside "
                             f"[-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}]")
        out[token] = float(value)
    return out


def combine(processors: Sequence[Optional[LogitsProcessor]]) -> Optional[LogitsProcessor]:
    """One processor adding up the biases of `processors` (None entries skipped)."""
    live = [p for p in processors if p is not None]
    if len(live) <= 1:
        return live[0] if live else None

    def combined(generated: list) -> Optional[np.ndarray]:
        total = None
        for p in live:
            bias = p(generated)
            if bias is not None:
                total = bias.astype(np.float32, copy=True) if total is None else total + bias
        return total

    return combined


# ---------------------------------------------------------------- regexes


def _outlines():
    try:
        import outlines_core
        import outlines_core.json_schema
    except ImportError:
        raise GrammarError("constrained decoding needs the outlines-core package "
                           "(pip install 'outlines-core>=0.2.14')") from None
    return outlines_core


def _any_object_regex() -> str:
    """Any JSON object nested at most two levels deep: its values are scalars, or arrays or
    objects of scalars. outlines-core's regex for an unconstrained object nests three levels and
    its automaton is huge (14 s to index even a 259-token vocabulary, against 0.4 s for this)."""
    ws = "[ ]?"
    string = r'"([^"\\\x00-\x1F\x7F-\x9F]|\\["\\/bfnrt])*"'
    number = r"(-)?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-][0-9]+)?"
    scalar = f"({string}|{number}|true|false|null)"

    def array(value: str) -> str:
        return rf"\[{ws}({value}({ws},{ws}{value})*)?{ws}\]"

    def obj(value: str) -> str:
        return rf"\{{{ws}({string}{ws}:{ws}{value}({ws},{ws}{string}{ws}:{ws}{value})*)?{ws}\}}"

    return obj(f"({scalar}|{array(scalar)}|{obj(scalar)})")


ANY_OBJECT = {"type": "object"}
_PLACEHOLDER = "lcjaxanyobject0f3a"  # stands for ANY_OBJECT while outlines-core writes the regex


def json_schema_regex(schema: Any) -> str:
    """The regex of JSON text valid under `schema` (a dict; None, True, {} mean any object).

    Every `{"type": "object"}` without further keywords, at the top or nested, becomes the
    bounded `_any_object_regex` (outlines-core's own would make the automaton explode)."""
    build_regex_from_schema = _outlines().json_schema.build_regex_from_schema

    if schema is True or schema is None or schema == {}:
        schema = ANY_OBJECT
    try:
        regex = build_regex_from_schema(json.dumps(_mark_any_objects(schema)))
    except Exception as err:  # noqa: BLE001 - the library raises plain exceptions for bad schemas
        raise GrammarError(f"unsupported JSON schema: {err}") from None
    return regex.replace(f'"{_PLACEHOLDER}"', _any_object_regex())


def _mark_any_objects(schema: Any) -> Any:
    if schema == ANY_OBJECT:
        return {"const": _PLACEHOLDER}
    if isinstance(schema, dict):
        return {k: _mark_any_objects(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_mark_any_objects(v) for v in schema]
    return schema


def choice_regex(choices: Sequence[str]) -> str:
    """The regex matching exactly one of `choices`."""
    if not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarError(f"a choice list must be non-empty strings; got {choices!r}")
    return "(" + "|".join(_escape(c) for c in choices) + ")"


def tool_call_regex(tools: Sequence[Mapping[str, Any]], name: Optional[str] = None,
                    parallel: bool = True) -> str:
    """Tool calls in the LongCat format (see lcjax/serve/tool_parser.py): one
    `<longcat_tool_call>{"name": N, "arguments": {...}}</longcat_tool_call>` block whose
    arguments follow the tool's `parameters` schema; with `parallel`, one or more blocks
    separated by a newline. `name` restricts the calls to that function."""
    alternatives = []
    for tool in tools:
        function = tool.get("function") or {}
        if name is not None and function.get("name") != name:
            continue
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        schema = {"type": "object", "properties": {"name": {"const": function["name"]},
                                                   "arguments": parameters},
                  "required": ["name", "arguments"]}
        try:
            alternatives.append(json_schema_regex(schema))
        except GrammarError as err:
            raise GrammarError(f"tool {function.get('name')!r}: {err}") from None
    if not alternatives:
        raise GrammarError(f"no tool named {name!r}")
    one = _escape(TOOL_CALL_START) + "(" + "|".join(alternatives) + ")" + _escape(TOOL_CALL_END)
    return f"{one}(\\n{one})*" if parallel else one


def _escape(text: str) -> str:
    return re.sub(r"([\\.^$|?*+()\[\]{}-])", r"\\\1", text)


# ---------------------------------------------------------------- the token vocabulary


def token_bytes(tokenizer: Any) -> dict[int, bytes]:
    """The bytes each ordinary token id decodes to (special tokens left out).

    Knows lcjax's ByteTokenizer (id b + 3 is byte b) and Hugging Face tokenizers whose decoder
    is byte-level (GPT-2 style) or metaspace with byte fallback (SentencePiece style).
    """
    hf = getattr(tokenizer, "hf", None)
    if hf is None:
        offset = 3 if getattr(tokenizer, "vocab_size", None) == 259 else None
        if offset is None:
            raise GrammarError(f"cannot list the vocabulary of {type(tokenizer).__name__}")
        return {b + offset: bytes([b]) for b in range(256)}
    spec = json.loads(hf.to_str())
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    decoders = _decoder_types(spec.get("decoder"))
    byte_level = "ByteLevel" in decoders
    unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    out = {}
    for piece, token in hf.get_vocab(with_added_tokens=True).items():
        if token in special:
            continue
        if byte_level:
            try:
                out[token] = bytes(unicode_to_byte[c] for c in piece)
            except KeyError:  # an added non-special token written as plain text
                out[token] = piece.encode("utf-8")
        else:
            match = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            out[token] = bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode()
    return out


def _decoder_types(decoder: Optional[dict]) -> set[str]:
    if not decoder:
        return set()
    return {decoder.get("type")} | {t for d in decoder.get("decoders", []) for t in _decoder_types(d)}


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# ---------------------------------------------------------------- guided decoding


class GrammarCompiler:
    """Builds (and caches) token-level indexes of regexes for one tokenizer and model.

    `vocab_size` is the model's (the logits' width; ids past the tokenizer's are banned)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_id: int, cache_size: int = 64):
        self.tokenizer, self.vocab_size, self.eos_id = tokenizer, vocab_size, eos_id
        self._vocabulary = None
        self._lock = threading.Lock()
        self.index = functools.lru_cache(maxsize=cache_size)(self._build_index)

    def vocabulary(self):
        Vocabulary = _outlines().Vocabulary

        with self._lock:
            if self._vocabulary is None:
                by_bytes: dict[bytes, list[int]] = {}
                for token, data in token_bytes(self.tokenizer).items():
                    if token != self.eos_id and token < self.vocab_size and data:
                        by_bytes.setdefault(data, []).append(token)
                self._vocabulary = Vocabulary(self.eos_id, by_bytes)
            return self._vocabulary

    def _build_index(self, regex: str):
        Index = _outlines().Index

        try:
            return Index(regex, self.vocabulary())
        except Exception as err:  # noqa: BLE001 - outlines-core raises plain exceptions
            raise GrammarError(f"cannot build a token mask for this grammar: {err}") from None

    def processor(self, regex: str) -> "GuidedDecoder":
        """A fresh processor (one per sequence: it keeps that sequence's automaton state)."""
        return GuidedDecoder(self.index(regex), self.vocab_size)


class GuidedDecoder:
    """A logits processor that bans every token leaving the regex's language.

    It follows the sequence's generated ids (advancing its automaton over the ids it has not
    seen; a shorter list than before, as after a recompute, replays from the start). A token
    the automaton rejects (only possible if the engine ignored the mask) switches the
    constraint off for the rest of the sequence rather than failing the request.
    """

    def __init__(self, index: Any, vocab_size: int):
        from outlines_core import Guide

        self.guide, self.vocab_size = Guide(index), vocab_size
        self._words = np.zeros((vocab_size + 31) // 32, np.int32)
        self._seen: list[int] = []
        self.broken = False

    def __call__(self, generated: list) -> Optional[np.ndarray]:
        if self.broken:
            return None
        n = len(self._seen)
        if len(generated) < n or (n and int(generated[n - 1]) != self._seen[-1]):
            self.guide.reset()  # the sequence was rewound: replay it
            self._seen, n = [], 0
        for token in generated[n:]:
            try:
                self.guide.advance(int(token), return_tokens=False)
            except Exception:  # noqa: BLE001 - outlines-core raises ValueError-like errors
                self.broken = True
                return None
            self._seen.append(int(token))
        self._words[:] = 0
        self.guide.write_mask_into(self._words.ctypes.data, self._words.size, 4)
        allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little")[:self.vocab_size]
        return np.where(allowed.astype(bool), np.float32(0), np.float32(-np.inf))

    @property
    def finished(self) -> bool:
        return self.guide.is_finished()
