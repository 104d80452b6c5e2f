"""After `Engine.warmup()`, no request compiles anything: a mixed workload (n, logprobs 0-20,
stop strings, penalties, sampling filters, a logits processor, speculative rounds, prompts of
one to several prefill chunks, requests joining a running batch) triggers no jit cache miss."""

import jax
import numpy as np
import pytest

from lcjax.serve.engine import Engine, EngineConfig
from lcjax.serve.sampling import SamplingParams

_LOWERINGS = []  # every jit cache miss in this process lowers a jaxpr to MLIR once


def _on_event(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
        _LOWERINGS.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _mixed_requests(vocab_size, rng):
    """(prompt, params, processor or None) of every kind the server sends the engine."""
    out = []
    for i in range(14):
        length = int(rng.choice([1, 3, 15, 16, 17, 40]))
        prompt = list(map(int, rng.integers(3, vocab_size, length)))
        kw = dict(max_tokens=int(rng.integers(1, 12)), seed=i)
        kind = i % 7
        if kind == 0:
            kw.update(temperature=0.0, logprobs=int(rng.choice([0, 1, 5, 9, 20])))
        elif kind == 1:
            kw.update(temperature=1.0, top_p=0.8, top_k=20, logprobs=20)
        elif kind == 2:
            kw.update(temperature=0.7, stop=("a", "zz"), presence_penalty=1.0,
                      frequency_penalty=0.5, repetition_penalty=1.3)
        elif kind == 3:
            kw.update(temperature=1.0, min_p=0.1, stop_token_ids=(5, 6), ignore_eos=True)
        elif kind == 4:
            kw.update(temperature=0.0, min_tokens=2, logprobs=3)
        processor = None
        if kind == 5:
            def processor(generated, v=vocab_size):
                bias = np.zeros((v,), np.float32)
                bias[: v // 2] = -np.inf  # only the upper half of the vocabulary
                return bias if len(generated) % 2 == 0 else None
        n = 1 + i % 4  # n > 1: n requests with the same prompt
        out += [(prompt, SamplingParams(**kw), processor)] * n
    return out


@pytest.mark.parametrize("k", [0, pytest.param(2, marks=pytest.mark.slow)])  # k=2: a second warm-up
def test_no_compilation_after_warmup(tiny_model, k):
    config, variables, tokenizer = tiny_model
    engine = Engine(config, variables, tokenizer, EngineConfig(
        max_num_seqs=4, max_model_len=96, page_size=8, prefill_chunk=16, max_prefill_seqs=2,
        num_speculative_tokens=k))
    jitted = (engine._prefill, engine._decode, engine._spec)
    plan = engine.compile_plan()
    assert len(plan) == 2 * 1 + 3  # prefill rows {1, 2} x length {16}; decode rows {1, 2, 4}
    assert engine.warmup() == len(plan)
    compiled, lowerings = sum(f._cache_size() for f in jitted), len(_LOWERINGS)
    assert compiled == len(plan) == engine.stats().num_compilations

    requests = _mixed_requests(engine.model_cfg.vocab_size, np.random.default_rng(k))
    pending, finals, it = list(requests), {}, 0
    while pending or engine.has_unfinished():
        for _ in range(int(it % 3 == 0) * 3):  # a few join between steps
            if pending:
                prompt, params, processor = pending.pop(0)
                engine.add_request(prompt, params, logits_processor=processor)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        it += 1
    assert len(finals) == len(requests)
    assert {o.finish_reason for o in finals.values()} <= {"stop", "length"}
    assert sum(f._cache_size() for f in jitted) == compiled
    assert engine.stats().num_compilations == len(plan)
    assert len(_LOWERINGS) == lowerings, "a request compiled something after warm-up"
    if k:  # every speculative round of a row without a processor proposes k drafts
        stats = engine.stats()
        assert stats.draft_tokens_total == k * stats.spec_rounds_total > 0
