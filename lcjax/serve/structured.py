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
- `AfterReasoning`: a constraint held off while the reply is inside a `<longcat_think>` block
  (chat with the reasoning parser on), so a thinking model reasons freely and the constraint
  holds from the token after `</longcat_think>`; its docstring gives the rule;
- `combine`: several processors summed.

Constrained output can still be cut short by `max_tokens` (finish_reason "length"); a complete
output always matches the regex. `GrammarCompiler` builds each regex's index once: on its own
threads (never the event loop or the engine's step thread), shared by every request asking
for the same regex while the build runs, then kept in an LRU cache. Needs the `outlines-core`
package (only when a request asks for a constraint).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import re
import threading
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from lcjax.serve.reasoning import THINK_END

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

    `vocab_size` is the model's (the logits' width; ids past the tokenizer's are banned).
    Builds run on `build_workers` threads of their own; a regex asked for while its build runs
    waits for that build (one build per regex), and `cache_size` built indexes are kept.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_id: int, cache_size: int = 64,
                 build_workers: int = 4):
        self.tokenizer, self.vocab_size, self.eos_id = tokenizer, vocab_size, eos_id
        self.cache_size = cache_size
        self._vocabulary = None
        self._vocabulary_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the two maps below; never held across a build
        self._built: collections.OrderedDict[str, Any] = collections.OrderedDict()  # LRU order
        self._building: dict[str, concurrent.futures.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(build_workers, thread_name_prefix="lcjax-grammar")
        self.num_builds = 0

    def vocabulary(self):
        Vocabulary = _outlines().Vocabulary

        with self._vocabulary_lock:
            if self._vocabulary is None:
                by_bytes: dict[bytes, list[int]] = {}
                for token, data in token_bytes(self.tokenizer).items():
                    if token != self.eos_id and token < self.vocab_size and data:
                        by_bytes.setdefault(data, []).append(token)
                self._vocabulary = Vocabulary(self.eos_id, by_bytes)
            return self._vocabulary

    def index_future(self, regex: str) -> concurrent.futures.Future:
        """The index of `regex` as a future: done at once when cached, else the running (or a
        newly started) build's. A failed build (GrammarError) is not cached."""
        with self._lock:
            if regex in self._built:
                self._built.move_to_end(regex)
                done: concurrent.futures.Future = concurrent.futures.Future()
                done.set_result(self._built[regex])
                return done
            future = self._building.get(regex)
            if future is None:
                future = self._building[regex] = self._pool.submit(self._build_and_keep, regex)
            return future

    def index(self, regex: str):
        """The index of `regex` (blocks while it is built)."""
        return self.index_future(regex).result()

    def _build_and_keep(self, regex: str):
        with self._lock:
            self.num_builds += 1
        try:
            index = self._build_index(regex)
        except BaseException:
            with self._lock:
                del self._building[regex]
            raise
        with self._lock:
            del self._building[regex]
            self._built[regex] = index
            while len(self._built) > self.cache_size:
                self._built.popitem(last=False)
        return index

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


def guided_processor(index: Any, vocab_size: int, after_reasoning: Optional[tuple] = None
                     ) -> Optional[LogitsProcessor]:
    """A GuidedDecoder over `index` (None when there is no index); with `after_reasoning`,
    wrapped in `AfterReasoning(decoder, *after_reasoning)`."""
    if index is None:
        return None
    decoder = GuidedDecoder(index, vocab_size)
    return decoder if after_reasoning is None else AfterReasoning(decoder, *after_reasoning)


# ---------------------------------------------------------------- constraints after reasoning


class AfterReasoning:
    """A constraint (`inner`, e.g. a GuidedDecoder) held off while the reply reasons.

    The rule, the same one lcjax/serve/reasoning.py splits the reply's text by:
    - the reply starts inside a `<longcat_think>` block when the prompt opens it
      (`starts_in_reasoning`: the rendered chat prompt ends with `<longcat_think>`), or when
      its first generated token is `think_start_id` (given when the tokenizer spells
      `<longcat_think>` as one token; the first step then allows that token besides the
      constraint's own, so a model whose template does not open the block may still think);
    - inside the block no mask applies; the block ends with the token that completes
      `</longcat_think>` (`think_end_id`, or its text through `token_text`), and `inner` sees
      the tokens after it, from its start state (text sharing that token is outside both);
    - otherwise `inner` holds from the first token, as without the reasoning parser (a
      grammar that itself spells out `<longcat_think>...` constrains the block too).

    Like GuidedDecoder it follows the generated ids and replays them after a rewind.
    """

    def __init__(self, inner: LogitsProcessor, token_text: Callable[[int], str],
                 starts_in_reasoning: bool = False, think_start_id: Optional[int] = None,
                 think_end_id: Optional[int] = None):
        self.inner, self.token_text = inner, token_text
        self.starts_in_reasoning = starts_in_reasoning
        self.think_start_id, self.think_end_id = think_start_id, think_end_id
        self._reset()

    def _reset(self) -> None:
        self.state = ("thinking" if self.starts_in_reasoning else
                      "undecided" if self.think_start_id is not None else "constrained")
        self.start = 0  # index of the first generated token the constraint sees
        self._seen: list[int] = []
        self._tail = ""  # the block's latest text, enough to find THINK_END across tokens
        self._start_banned = True  # the constraint itself bans think_start_id at the first step

    def __call__(self, generated: list) -> Optional[np.ndarray]:
        n = len(self._seen)
        if len(generated) < n or (n and int(generated[n - 1]) != self._seen[-1]):
            self._reset()
        for token in generated[len(self._seen):]:
            self._advance(int(token))
        if self.state == "thinking":
            return None
        bias = self.inner(list(generated[self.start:]))
        if self.state == "undecided":
            self._start_banned = bias is not None and bool(np.isneginf(bias[self.think_start_id]))
            if bias is not None and self._start_banned:
                bias = bias.copy()
                bias[self.think_start_id] = 0.0
        return bias

    def _advance(self, token: int) -> None:
        position = len(self._seen)
        self._seen.append(token)
        if self.state == "undecided":
            self.state = "thinking" if token == self.think_start_id and self._start_banned else "constrained"
        elif self.state == "thinking":
            self._tail = (self._tail + self.token_text(token))[-2 * len(THINK_END):]
            if token == self.think_end_id or THINK_END in self._tail:
                self.state, self.start = "constrained", position + 1
