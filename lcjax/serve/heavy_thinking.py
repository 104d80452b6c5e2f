"""Heavy Thinking mode (LongCat-Flash-Thinking-2601 report §4; spec longcat-architecture.md §5).

Two stages over one engine:
  1. width: N reasoning traces of the same prompt, sampled independently at a set temperature
     (they are N requests, so the engine runs them as one continuous batch);
  2. depth: one summary request whose prompt shows the problem and the traces' answers in the
     published layout (`build_summary_prompt`) and asks for a final answer in the same style
     and format; its output is what the caller gets back.

`heavy_think` drives a synchronous `Engine` itself (like `Engine.generate`, it must own the
engine while it runs); `heavy_think_async` takes `AsyncEngine.generate`. The HTTP layer runs
`run_traces_async` then `fit_summary_prompt` and sends the summary as an ordinary (streamable)
request. All derive every random choice (trace seeds, the order traces are shown in) from
`params.seed`, so a seeded request gives the same summary every time.

Context budget (`budget`): with max_model_len L and a prompt of P tokens, each trace may use
up to L - P tokens; the summary prompt costs F tokens before any trace answer (template,
problem: `summary_fixed_tokens`); the summary keeps S = summary_max_tokens (else the request's
max_tokens; else (L - F) // 2, half of what the answers and the summary share) tokens for its
answer, and its prompt must fit in L - S tokens.
`fit_summary_prompt` guarantees that: when the traces' answers do not fit, each answer is cut
to its last tokens (the conclusion is at the end), longest first, so every answer gets an
equal share of the room or all of itself if shorter ("water-filling"); a cut answer starts with
TRIM_MARK. Only the problem and the template's fixed text are never cut: if they alone do not
fit, that is a ValueError before any trace runs (`check_fits`).

Choices the report leaves open (UNCONFIRMED, see spec §5/§6):
- N: not stated. Figure 10 draws 3 thinkers (our default); the public demo reportedly shows 8.
- Trace sampling: "reasonably high" temperature; the report evaluates at temperature 1.0,
  top-p 1.0 (spec techniques.md "Heavy Thinking"), which are our defaults.
- Template: the opening sentence and the marker lines are as quoted in the spec (Figure 10
  elides the rest); where the problem goes and the closing instruction are ours, kept short.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import numbers
import typing
from typing import Any, AsyncIterator, Callable, Optional, Sequence

import numpy as np

from lcjax.serve.engine import Engine
from lcjax.serve.outputs import RequestOutput
from lcjax.serve.sampling import SamplingParams

INTRO = ("Here is a problem, and multiple thinkers try to give their thought processes "
         "independently.")
PROCESS_START = "==== Thinkers Process Start ===="
PROCESS_END = "==== Thinkers Process End ===="
THINKER = "# ----- Thinker #{i} -----"
OUTRO = ("Reflect on the thinkers' processes above and give your final answer to the problem, "
         "in the same style and format as a thinker's response.")

# Reasoning blocks stripped in answer-only mode: LongCat's `<longcat_think>` (vLLM's
# LongcatReasoningParser markers) and the common `<think>`.
THINK_TAGS = (("<longcat_think>", "</longcat_think>"), ("<think>", "</think>"))
_SEED_SALT = 0x4EA7  # separates our derived streams from a plain `default_rng(seed)`


@typing.no_type_check  # user input: __post_init__ raises ValueError, not the test-time type checker
@dataclasses.dataclass(frozen=True)
class HeavyThinkingConfig:
    """How one Heavy Thinking request runs.

    num_traces: parallel reasoning traces (N). temperature / top_p: trace sampling.
    trace_max_tokens: per-trace limit (None: the request's max_tokens).
    summary_max_tokens: the summary's limit (None: the request's max_tokens; see `budget`).
    summary_temperature: summary sampling temperature (None: the request's).
    return_traces: hand the traces back with the summary.
    answer_only: show the summary model only each trace's answer (reasoning blocks stripped).
    """

    num_traces: int = 3
    temperature: float = 1.0
    top_p: float = 1.0
    trace_max_tokens: Optional[int] = None
    summary_max_tokens: Optional[int] = None
    summary_temperature: Optional[float] = None
    return_traces: bool = False
    answer_only: bool = True

    def __post_init__(self):
        _check_int("num_traces", self.num_traces, 1, 64)
        _check_real("temperature", self.temperature, 0.0, 100.0)
        _check_real("top_p", self.top_p, 0.0, 1.0, low_open=True)
        for name in ("trace_max_tokens", "summary_max_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1, None)
        if self.summary_temperature is not None:
            _check_real("summary_temperature", self.summary_temperature, 0.0, 100.0)
        for name in ("return_traces", "answer_only"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"heavy_thinking {name} must be a bool; got {getattr(self, name)!r}")


@dataclasses.dataclass
class HeavyThinkingResult:
    """summary: the final output (what the request returns). traces: the stage-1 outputs in
    generation order (empty unless `return_traces`). summary_prompt: the text the summary
    request was rendered from. trace_tokens: tokens generated by all traces (for usage)."""

    summary: RequestOutput
    traces: list[RequestOutput]
    summary_prompt: str
    trace_tokens: int


def _check_int(name: str, value, low: int, high: Optional[int]) -> None:
    ok = (isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
          and value >= low and (high is None or value <= high))
    if not ok:
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"heavy_thinking {name} must be an integer in {bound}; got {value!r}")


def _check_real(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    ok = (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
          and not math.isnan(value) and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        raise ValueError(f"heavy_thinking {name} must be a number in {'(' if low_open else '['}"
                         f"{low}, {high}]; got {value!r}")


# ------------------------------------------------------------------------------ the template
def answer_part(text: str) -> str:
    """The answer content of one trace: the text after the last closing reasoning tag.

    With no closing tag, an opening tag means the trace ran out of tokens while reasoning, so it
    has no answer (the text before the tag, usually empty); with neither, all of it.
    """
    for _, close in THINK_TAGS:
        if close in text:
            return text.rsplit(close, 1)[1].strip()
    for open_, _ in THINK_TAGS:
        if open_ in text:
            return text.split(open_, 1)[0].strip()
    return text.strip()


def build_summary_prompt(problem: str, traces: Sequence[str], *, answer_only: bool = True,
                         permutation: Optional[Sequence[int]] = None) -> str:
    """The summary request's user message in the published layout.

    Thinker #i shows `traces[permutation[i - 1]]` (identity when None), so the summary model
    sees the traces in the order the caller drew; `answer_only` shows only `answer_part` of
    each.
    """
    n = len(traces)
    order = list(range(n)) if permutation is None else [int(i) for i in permutation]
    if sorted(order) != list(range(n)):
        raise ValueError(f"permutation {list(permutation)} is not a permutation of range({n})")
    blocks = []
    for i, j in enumerate(order, start=1):
        body = answer_part(traces[j]) if answer_only else traces[j].strip()
        blocks.append(f"{THINKER.format(i=i)}\n{body}\n")
    return "\n".join([INTRO, "", problem.strip(), "", PROCESS_START, *blocks, PROCESS_END, "", OUTRO])


# ------------------------------------------------------------------------------ the two stages
@dataclasses.dataclass(frozen=True)
class _Plan:
    trace_params: list[SamplingParams]
    permutation: list[int]
    summary_params: SamplingParams


def _plan(params: SamplingParams, cfg: HeavyThinkingConfig) -> _Plan:
    """Trace sampling params and the display order, all drawn from params.seed when given."""
    n = cfg.num_traces
    rng = np.random.default_rng(None if params.seed is None else [_SEED_SALT, params.seed])
    seeds = rng.choice(2**31, size=n, replace=False)  # distinct: N different traces
    permutation = [int(i) for i in rng.permutation(n)]
    max_tokens = cfg.trace_max_tokens or params.max_tokens
    base = dataclasses.replace(params, temperature=cfg.temperature, top_p=cfg.top_p,
                               max_tokens=max_tokens, min_tokens=min(params.min_tokens, max_tokens),
                               logprobs=None)
    traces = [dataclasses.replace(base, seed=int(s)) for s in seeds]
    summary = params if cfg.summary_temperature is None else dataclasses.replace(
        params, temperature=cfg.summary_temperature)
    return _Plan(traces, permutation, summary)


def _summary_ids(prompt: str, tokenizer: Any,
                 render_summary_prompt: Optional[Callable[[str], list[int]]]) -> list[int]:
    if render_summary_prompt is not None:
        return list(render_summary_prompt(prompt))
    if tokenizer is None:
        raise ValueError("heavy thinking needs a tokenizer (or render_summary_prompt) to encode "
                         "the summary prompt")
    return list(tokenizer.encode(prompt))


def _result(cfg: HeavyThinkingConfig, plan: _Plan, traces: list[RequestOutput], summary: RequestOutput,
            prompt: str) -> HeavyThinkingResult:
    return HeavyThinkingResult(summary=summary, traces=traces if cfg.return_traces else [],
                               summary_prompt=prompt,
                               trace_tokens=sum(t.num_generated_tokens for t in traces))


def _run(engine: Engine, ids: list[str]) -> list[RequestOutput]:
    """Step the engine until the given requests finish; their final outputs in order."""
    final: dict[str, RequestOutput] = {}
    try:
        while len(final) < len(ids):
            for out in engine.step():
                if out.finished and out.request_id in ids:
                    final[out.request_id] = out
    finally:
        for i in ids:
            if i not in final:
                engine.abort(i)
    return [final[i] for i in ids]


def heavy_think(engine: Engine, prompt_ids: Sequence[int], problem_text: str, params: SamplingParams,
                cfg: HeavyThinkingConfig = HeavyThinkingConfig(), tokenizer: Any = None,
                render_summary_prompt: Optional[Callable[[str], list[int]]] = None) -> HeavyThinkingResult:
    """Run one Heavy Thinking request on a synchronous engine (which it steps until done).

    Args:
      prompt_ids: the rendered conversation (chat template applied) the traces continue.
      problem_text: the problem as shown to the summary model (the last user message).
      params: the request's sampling params: traces use them with cfg's temperature/top_p and
        derived seeds; the summary uses them as given (cfg.summary_temperature aside).
      tokenizer: encodes the summary prompt when `render_summary_prompt` is None (default:
        `engine.tokenizer`).
      render_summary_prompt: text -> token ids; the API layer passes its chat template here.
    Raises ValueError (nothing left running) for a prompt or summary prompt the engine rejects.
    Cost: N trace requests in one batch, then one summary request of about N trace answers.
    """
    plan = _plan(params, cfg)
    ids: list[str] = []
    try:
        for p in plan.trace_params:
            ids.append(engine.add_request(prompt_ids, p))
    except ValueError:
        for i in ids:
            engine.abort(i)
        raise
    traces = _run(engine, ids)
    prompt = build_summary_prompt(problem_text, [t.text for t in traces], answer_only=cfg.answer_only,
                                  permutation=plan.permutation)
    token_ids = _summary_ids(prompt, tokenizer if tokenizer is not None else engine.tokenizer,
                             render_summary_prompt)
    summary = _run(engine, [engine.add_request(token_ids, plan.summary_params)])[0]
    return _result(cfg, plan, traces, summary, prompt)


TRIM_MARK = "[...] "  # starts an answer that was cut to fit the summary prompt


def summary_fixed_tokens(problem_text: str, num_traces: int, encode: Callable[[str], list[int]]) -> int:
    """Tokens of the summary prompt with every answer empty (`encode` renders and encodes)."""
    return len(encode(build_summary_prompt(problem_text, [""] * num_traces)))


def budget(params: SamplingParams, cfg: HeavyThinkingConfig, prompt_len: int, max_model_len: int,
           fixed_tokens: int, max_tokens_given: bool = True) -> tuple[SamplingParams, HeavyThinkingConfig]:
    """(summary params, cfg) with the token limits of the module docstring's budget filled in.

    fixed_tokens: F, from `summary_fixed_tokens`. max_tokens_given: whether params.max_tokens
    is the caller's choice (False: it is only the room left after the prompt).
    ValueError naming the field when a limit cannot fit.
    """
    room = max_model_len - prompt_len
    if room < 1:
        raise ValueError(f"the prompt has {prompt_len} tokens, leaving no room in max_model_len {max_model_len}")
    trace = cfg.trace_max_tokens or params.max_tokens
    if trace > room:
        raise ValueError(f"heavy_thinking trace_max_tokens {trace} does not fit: the prompt has "
                         f"{prompt_len} of max_model_len {max_model_len} tokens")
    summary = cfg.summary_max_tokens or (params.max_tokens if max_tokens_given
                                         else max(1, (max_model_len - fixed_tokens) // 2))
    if fixed_tokens + summary > max_model_len:
        name = "summary_max_tokens" if cfg.summary_max_tokens else "max_tokens"
        raise ValueError(f"the heavy_thinking summary prompt needs {fixed_tokens} tokens before any "
                         f"trace answer; with {name} {summary} that is more than max_model_len "
                         f"{max_model_len}")
    cfg = dataclasses.replace(cfg, trace_max_tokens=trace, summary_max_tokens=summary)
    params = dataclasses.replace(params, max_tokens=summary, min_tokens=min(params.min_tokens, summary))
    return params, cfg


def fit_summary_prompt(problem_text: str, traces: Sequence[str], cfg: HeavyThinkingConfig,
                       permutation: Sequence[int], encode: Callable[[str], list[int]],
                       tokenizer: Any, limit: int) -> tuple[str, list[int]]:
    """(summary prompt text, its token ids from `encode`) in at most `limit` tokens, cutting
    the answers as the module docstring says. `encode` renders and encodes (the chat template);
    `tokenizer` measures and cuts the answers themselves."""
    answers = [answer_part(t) if cfg.answer_only else t.strip() for t in traces]

    def render(parts: list[str]) -> tuple[str, list[int]]:
        text = build_summary_prompt(problem_text, parts, answer_only=False, permutation=permutation)
        return text, list(encode(text))

    text, ids = render(answers)
    if len(ids) <= limit:
        return text, ids
    room = limit - len(render([""] * len(answers))[1])
    tokens = [list(tokenizer.encode(a)) for a in answers]
    mark = len(tokenizer.encode(TRIM_MARK))
    for _ in range(8):  # re-tokenising cut text can differ by a few tokens: shrink until it fits
        cap = _water_level([len(t) for t in tokens], max(0, room))
        cut = [a if len(t) <= cap else (TRIM_MARK + tokenizer.decode(t[len(t) - (cap - mark):])
                                        if cap > mark else "") for a, t in zip(answers, tokens)]
        text, ids = render(cut)
        if len(ids) <= limit:
            return text, ids
        room -= len(ids) - limit
    raise ValueError(f"the heavy_thinking summary prompt does not fit in {limit} tokens")


def _water_level(lengths: Sequence[int], room: int) -> int:
    """The largest cap with sum(min(length, cap)) <= room (everything fits: the longest length)."""
    if sum(lengths) <= room:
        return max(lengths, default=0)
    remaining, left = room, len(lengths)
    for length in sorted(lengths):
        share = remaining // left
        if length > share:
            return share
        remaining -= length
        left -= 1
    return remaining


async def run_traces_async(generate: "GenerateFn", prompt_ids: Sequence[int], params: SamplingParams,
                           cfg: HeavyThinkingConfig) -> tuple[list[RequestOutput], list[int], SamplingParams]:
    """Stage 1 over `AsyncEngine.generate`: (the traces in generation order, the permutation to
    show them in, the summary's sampling params). Cancelling it cancels every trace."""
    plan = _plan(params, cfg)
    tasks = [asyncio.ensure_future(_final(generate, list(prompt_ids), p)) for p in plan.trace_params]
    try:
        traces = list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return traces, plan.permutation, plan.summary_params


GenerateFn = Callable[[list[int], SamplingParams], AsyncIterator[RequestOutput]]


class HeavyThinkingAborted(RuntimeError):
    """A trace or the summary was aborted (engine shutdown) before it finished."""


async def _final(generate: GenerateFn, prompt_ids: list[int], params: SamplingParams) -> RequestOutput:
    last = None
    async with contextlib.aclosing(generate(prompt_ids, params)) as outputs:
        async for last in outputs:
            pass
    if last is None or last.finish_reason == "abort":
        raise HeavyThinkingAborted("a heavy-thinking request was aborted before it finished")
    return last


async def heavy_think_async(generate: GenerateFn, prompt_ids: Sequence[int], problem_text: str,
                            params: SamplingParams, cfg: HeavyThinkingConfig = HeavyThinkingConfig(),
                            tokenizer: Any = None,
                            render_summary_prompt: Optional[Callable[[str], list[int]]] = None,
                            ) -> HeavyThinkingResult:
    """`heavy_think` over `AsyncEngine.generate`: the N traces run concurrently, then the summary.

    If one trace fails (bad prompt, engine error) or the caller is cancelled, the other traces
    are cancelled too, which aborts their engine requests.
    """
    plan = _plan(params, cfg)
    traces, permutation, summary_params = await run_traces_async(generate, prompt_ids, params, cfg)
    prompt = build_summary_prompt(problem_text, [t.text for t in traces], answer_only=cfg.answer_only,
                                  permutation=permutation)
    token_ids = _summary_ids(prompt, tokenizer, render_summary_prompt)
    summary = await _final(generate, token_ids, summary_params)
    return _result(cfg, plan, traces, summary, prompt)
