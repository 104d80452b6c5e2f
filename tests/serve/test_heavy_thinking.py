"""Heavy Thinking: the summary template, and both drivers over the real engine (tiny model).

One engine serves the whole module and every run keeps to its few step shapes (prefill rows 1 or
4 of 16 tokens, decode rows 1 or 4), so XLA:CPU compiles four functions in all. The tiny model
is left at its random init, whose near-uniform logits make differently seeded traces differ.
"""

import asyncio
import dataclasses

import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.serve.async_engine import AsyncEngine
from lcjax.serve.engine import Engine, EngineConfig
from lcjax.serve.heavy_thinking import (PROCESS_END, PROCESS_START, HeavyThinkingConfig, answer_part,
                                        build_summary_prompt, heavy_think, heavy_think_async)
from lcjax.serve.sampling import SamplingParams

from tests.model.conftest import init_variables


class Latin1Tokenizer:
    """Id = code point for chr(3)..chr(255) (newlines included); 0-2 are pad/bos/eos."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if 3 <= i < 256)


PROBLEM = "What is 6 * 7?"
PARAMS = SamplingParams(max_tokens=5, temperature=0.7, seed=7, ignore_eos=True)
CFG = HeavyThinkingConfig(num_traces=3, temperature=1.0, top_p=0.9, trace_max_tokens=8,
                          return_traces=True)


# ------------------------------------------------------------------------------ template
def test_layout_markers_order_and_permutation():
    traces = ["alpha", "beta", "gamma"]
    text = build_summary_prompt(PROBLEM, traces, permutation=[2, 0, 1])
    assert text.startswith("Here is a problem, and multiple thinkers try to give their thought "
                           "processes independently")
    lines = text.splitlines()
    start, end = lines.index(PROCESS_START), lines.index(PROCESS_END)
    assert lines.index(PROBLEM) < start < end
    headers = [i for i, line in enumerate(lines) if line.startswith("# ----- Thinker #")]
    assert [lines[i] for i in headers] == [f"# ----- Thinker #{k} -----" for k in (1, 2, 3)]
    assert [lines[i + 1] for i in headers] == ["gamma", "alpha", "beta"]  # Thinker #k = traces[perm[k-1]]
    assert start < headers[0] and headers[-1] < end
    assert "same style and format" in "\n".join(lines[end:])
    assert build_summary_prompt(PROBLEM, traces) == build_summary_prompt(PROBLEM, traces,
                                                                         permutation=[0, 1, 2])
    for bad in ([0, 1], [0, 0, 1], [1, 2, 3]):
        with pytest.raises(ValueError, match="permutation"):
            build_summary_prompt(PROBLEM, traces, permutation=bad)


def test_answer_only_strips_reasoning_blocks():
    traces = ["<longcat_think>\nsix sevens...\n</longcat_think>\n\nThe answer is 42.",
              "<think>maybe 41</think>42",
              "reasoning whose opening tag was in the prompt</longcat_think> 42",
              "<longcat_think>ran out of tokens while thin",
              "plain answer 42"]
    assert [answer_part(t) for t in traces] == ["The answer is 42.", "42", "42", "", "plain answer 42"]
    text = build_summary_prompt(PROBLEM, traces)
    assert "six sevens" not in text and "maybe 41" not in text and "ran out" not in text
    full = build_summary_prompt(PROBLEM, traces, answer_only=False)
    assert all(t.strip() in full for t in traces)


@pytest.mark.parametrize("field, value", [
    ("num_traces", 0), ("num_traces", 2.0), ("num_traces", True), ("num_traces", 65),
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("trace_max_tokens", 0), ("summary_temperature", -1.0), ("return_traces", "yes"),
    ("answer_only", 1)])
def test_bad_config_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        HeavyThinkingConfig(**{field: value})


# ------------------------------------------------------------------------------ over the engine
@pytest.fixture(scope="module")
def engine():
    cfg = load_config(resolve_config_path("tiny")).model
    return Engine(cfg, init_variables(cfg, seed=3), Latin1Tokenizer(), EngineConfig(
        max_num_seqs=4, max_model_len=cfg.max_position_embeddings, page_size=16, prefill_chunk=16))


@pytest.fixture(scope="module")
def prompt_ids():
    return Latin1Tokenizer().encode("<|user|>\n" + PROBLEM + "\n<|assistant|>\n")


class Spy:
    """Records each add_request's params and how many requests each step advanced."""

    def __init__(self, engine, monkeypatch):
        self.added, self.progressed = [], []
        add, step = engine.add_request, engine.step

        def spy_add(prompt, params, *args, **kwargs):
            self.added.append((list(prompt), params))
            return add(prompt, params, *args, **kwargs)

        def spy_step():
            outs = step()
            self.progressed.append(len(outs))
            return outs

        monkeypatch.setattr(engine, "add_request", spy_add)
        monkeypatch.setattr(engine, "step", spy_step)


@pytest.fixture(scope="module")
def first_run(engine, prompt_ids):
    return heavy_think(engine, prompt_ids, PROBLEM, PARAMS, CFG)


@pytest.mark.slow  # N traces through the engine; the HTTP tests run a smaller heavy-thinking request
def test_traces_run_in_parallel_at_the_set_temperature(engine, prompt_ids, monkeypatch):
    spy = Spy(engine, monkeypatch)
    result = heavy_think(engine, prompt_ids, PROBLEM, PARAMS, CFG)
    (*trace_requests, (summary_prompt, summary_params)) = spy.added
    assert len(trace_requests) == 3 and all(p == prompt_ids for p, _ in trace_requests)
    seeds = {sp.seed for _, sp in trace_requests}
    assert len(seeds) == 3 and PARAMS.seed not in seeds
    for _, sp in trace_requests:
        assert (sp.temperature, sp.top_p, sp.max_tokens) == (1.0, 0.9, 8)
    assert summary_params == PARAMS  # the caller's params, unchanged
    # one continuous batch: each step that advanced a trace advanced all three, then the summary
    assert [n for n in spy.progressed if n] == [3] * 8 + [1] * PARAMS.max_tokens
    texts = [t.text for t in result.traces]
    assert len(set(texts)) == 3 and all(t.num_generated_tokens == 8 for t in result.traces)
    for text in texts:
        assert f"\n{text.strip()}\n" in result.summary_prompt
    assert result.trace_tokens == 24
    stats = engine.stats()
    assert stats.num_running == 0 and stats.free_pages == stats.total_pages


def test_the_summary_is_what_is_returned(engine, first_run):
    result = first_run
    tok = Latin1Tokenizer()
    assert result.summary.prompt_token_ids == tok.encode(result.summary_prompt)
    assert result.summary.finished and result.summary.num_generated_tokens == PARAMS.max_tokens
    # the same request on its own gives the same text: the returned output is the summary's
    alone = engine.generate([tok.encode(result.summary_prompt)], PARAMS)[0]
    assert alone.token_ids == result.summary.token_ids and alone.text == result.summary.text


def test_deterministic_under_a_seed_and_traces_only_on_request(engine, prompt_ids, first_run):
    again = heavy_think(engine, prompt_ids, PROBLEM, PARAMS, dataclasses.replace(CFG, return_traces=False))
    assert again.traces == [] and again.trace_tokens == 24
    assert again.summary_prompt == first_run.summary_prompt
    assert again.summary.token_ids == first_run.summary.token_ids
    other = heavy_think(engine, prompt_ids, PROBLEM, dataclasses.replace(PARAMS, seed=8), CFG)
    assert [t.text for t in other.traces] != [t.text for t in first_run.traces]


def test_render_hook_and_summary_temperature(engine, prompt_ids):
    rendered = []

    def render(text):
        rendered.append(text)
        return Latin1Tokenizer().encode("<|user|>\n" + text + "\n<|assistant|>\n")

    cfg = HeavyThinkingConfig(num_traces=3, trace_max_tokens=4, summary_temperature=0.0)
    result = heavy_think(engine, prompt_ids, PROBLEM, PARAMS, cfg, render_summary_prompt=render)
    assert rendered == [result.summary_prompt]
    assert result.summary.prompt_token_ids == render(result.summary_prompt)
    greedy = engine.generate([render(result.summary_prompt)], dataclasses.replace(PARAMS, temperature=0.0))
    assert result.summary.token_ids == greedy[0].token_ids


def test_async_variant_matches_sync_and_cleans_up(engine, prompt_ids, first_run):
    async_engine = AsyncEngine(engine)
    try:
        async def main():
            result = await heavy_think_async(async_engine.generate, prompt_ids, PROBLEM, PARAMS, CFG,
                                             tokenizer=Latin1Tokenizer())
            with pytest.raises(ValueError, match="max_model_len"):
                await heavy_think_async(async_engine.generate, list(range(3, 600)), PROBLEM, PARAMS, CFG,
                                        tokenizer=Latin1Tokenizer())
            return result

        result = asyncio.run(main())
    finally:
        async_engine.shutdown()
    # seeded requests give the same tokens whatever they are batched with
    assert [t.token_ids for t in result.traces] == [t.token_ids for t in first_run.traces]
    assert result.summary_prompt == first_run.summary_prompt
    assert result.summary.token_ids == first_run.summary.token_ids
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.free_pages == stats.total_pages


# ------------------------------------------------------------------------------ context budget
def test_budget_fills_limits_and_names_the_field_that_cannot_fit():
    from lcjax.serve.heavy_thinking import budget

    params = SamplingParams(max_tokens=400)
    # No max_tokens from the caller: traces may use all the room, the summary half of it.
    # No max_tokens from the caller: traces may use all the room, the summary half of what is
    # left after the summary prompt's fixed part (here 312 tokens).
    summary, cfg = budget(params, HeavyThinkingConfig(), 112, 512, 312, max_tokens_given=False)
    assert (cfg.trace_max_tokens, cfg.summary_max_tokens, summary.max_tokens) == (400, 100, 100)
    summary, cfg = budget(params, HeavyThinkingConfig(trace_max_tokens=50, summary_max_tokens=9), 112, 512, 312)
    assert (cfg.trace_max_tokens, summary.max_tokens) == (50, 9)
    with pytest.raises(ValueError, match="trace_max_tokens 500"):
        budget(params, HeavyThinkingConfig(trace_max_tokens=500), 112, 512, 312)
    with pytest.raises(ValueError, match="needs 312 tokens before any trace answer; with summary_max_tokens 201"):
        budget(params, HeavyThinkingConfig(summary_max_tokens=201), 112, 512, 312)
    with pytest.raises(ValueError, match="with max_tokens 400"):  # the request's own max_tokens
        budget(params, HeavyThinkingConfig(), 112, 512, 312)


def test_fit_summary_prompt_cuts_long_answers_to_equal_shares_and_keeps_their_ends():
    from lcjax.serve.heavy_thinking import TRIM_MARK, _water_level, fit_summary_prompt, summary_fixed_tokens

    assert _water_level([5, 50, 100], 1000) == 100  # everything fits
    assert _water_level([5, 50, 100], 65) == 30  # 5 + 30 + 30
    assert _water_level([5, 50, 100], 10) == 3
    tok = Latin1Tokenizer()
    cfg = HeavyThinkingConfig(num_traces=3, summary_max_tokens=10)
    traces = ["short", "x" * 300 + " END1", "<longcat_think>" + "r" * 999 + "</longcat_think>" + "y" * 500 + " END2"]
    fixed = len(tok.encode(build_summary_prompt(PROBLEM, ["", "", ""])))
    for limit in (fixed + 5 + 100, fixed + 40, fixed):
        text, ids = fit_summary_prompt(PROBLEM, traces, cfg, [0, 1, 2], tok.encode, tok, limit)
        assert len(ids) <= limit and ids == tok.encode(text)
        assert "r" * 20 not in text  # answer_only: the reasoning is never shown
        if limit == fixed + 5 + 100:  # 5 for "short", the rest split evenly, ends kept
            assert "short" in text and text.count(TRIM_MARK) == 2 and "END1" in text and "END2" in text
            assert len(ids) >= limit - 3
    untouched, _ = fit_summary_prompt(PROBLEM, ["a", "b"], cfg, [1, 0], tok.encode, tok, 10_000)
    assert untouched == build_summary_prompt(PROBLEM, ["a", "b"], permutation=[1, 0])
    assert summary_fixed_tokens(PROBLEM, 3, tok.encode) == fixed
