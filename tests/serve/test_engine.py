"""The continuous-batching engine against an independent greedy loop over the full forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.model import LongCatModel
from lcjax.serve.engine import Engine, EngineConfig
from lcjax.serve.sampling import SamplingParams

from tests.model.conftest import init_variables


class CharTokenizer:
    """Ids 3.. are bytes - 29 (printable ASCII), enough for stop-string tests."""

    eos_id = 2

    def encode(self, text):
        return [ord(c) - 29 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 29) for i in ids if i >= 3)


@pytest.fixture(scope="module")
def model():
    cfg = load_config(resolve_config_path("tiny")).model
    variables = init_variables(cfg, seed=3)
    # Random init gives near-uniform logits; spread them so greedy choices are not near-ties
    # that float reassociation across batch shapes could flip.
    variables["params"]["lm_head"] = variables["params"]["lm_head"] * 40.0
    return cfg, variables


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jax.jit(LongCatModel(cfg).apply)


def greedy_reference(cfg, variables, prompt, steps, width=128):
    """Greedy tokens from the plain full forward (no cache), one forward per token."""
    ids = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(ids)] = ids
        logits = _forward(cfg)(variables, jnp.asarray(padded))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt):]


def _prompts(cfg, lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = [list(map(int, rng.integers(3, cfg.vocab_size, n))) for n in lengths]
    if len(out) > 1:
        out[1][4] = cfg.eos_token_id  # an EOS inside a prompt resets the n-gram history
    return out


GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def workload(model):
    cfg, variables = model
    prompts = _prompts(cfg, [5, 40, 13, 29, 3, 61])
    want = [greedy_reference(cfg, variables, p, GREEDY.max_tokens) for p in prompts]
    return prompts, want


def _run_staggered(engine, prompts, params):
    """Three requests first, the rest joining the running batch between decode steps."""
    ids = [engine.add_request(p, params) for p in prompts[:3]]
    finals, rest = {}, list(prompts[3:])
    for it in range(1000):
        if rest and it in (2, 4, 5):
            ids.append(engine.add_request(rest.pop(0), params))
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if len(finals) == len(prompts) and not rest:
            break
    return [finals[i] for i in ids]


@pytest.mark.parametrize("k", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_greedy_under_mixed_load_equals_single_request(model, workload, k):
    cfg, variables = model
    prompts, want = workload
    engine = Engine(cfg, variables, None, EngineConfig(
        max_num_seqs=4, max_model_len=96, page_size=8, prefill_chunk=16, max_prefill_seqs=2,
        num_speculative_tokens=k))
    outs = _run_staggered(engine, prompts, GREEDY)
    for p, got, ref in zip(prompts, outs, want):
        assert got.token_ids == ref, f"prompt of {len(p)} tokens"
        assert got.finish_reason == "length"
    stats = engine.stats()
    assert stats.free_pages == stats.total_pages and stats.num_running == 0
    if k:
        assert stats.draft_tokens_total > 0
        assert 0 <= stats.accepted_tokens_total <= stats.draft_tokens_total
    # Buckets bound the compilations: decode rows {1, 2, 4}, prefill rows {1, 2} x length {16};
    # the engine's count agrees with jax's own cache of compiled executables.
    assert stats.num_compilations <= 3 + 2
    jitted = (engine._prefill, engine._decode, engine._spec)
    assert stats.num_compilations == sum(f._cache_size() for f in jitted)


def test_prefill_chunk_longer_than_sparse_ring(model, workload):
    cfg, variables = model
    prompts, want = workload
    engine = Engine(cfg, variables, None, EngineConfig(max_num_seqs=2, max_model_len=96,
                                                       page_size=16, prefill_chunk=64))
    assert 64 > cfg.loza.cache_tokens
    outs = engine.generate(prompts[-2:], GREEDY)
    assert [o.token_ids for o in outs] == want[-2:]


def test_same_seed_same_text_and_pages_freed(model):
    cfg, variables = model
    engine = Engine(cfg, variables, CharTokenizer(), EngineConfig(max_num_seqs=3, max_model_len=64,
                                                                  page_size=8))
    prompt = _prompts(cfg, [7])[0]

    def run(seed, **kw):
        params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=seed,
                                ignore_eos=True, **kw)
        return engine.generate([prompt], params)[0].token_ids

    a, b, c = run(5), run(5), run(6)
    assert a == b and a != c
    # the same request beside others still gives the same tokens
    others = SamplingParams(max_tokens=5, temperature=0.7, seed=9)
    outs = engine.generate([prompt, prompt[:3], prompt], [
        SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True),
        others, others])
    assert outs[0].token_ids == a
    stats = engine.stats()
    assert stats.free_pages == stats.total_pages


def test_stop_conditions(model):
    cfg, variables = model
    tok = CharTokenizer()
    engine = Engine(cfg, variables, tok, EngineConfig(max_num_seqs=2, max_model_len=64, page_size=8))
    prompt = _prompts(cfg, [9])[0]
    free = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    ids = free.token_ids
    # stop token id: generation ends at it, the token is kept in token_ids, not in the text
    stop_tok = ids[5]
    first = ids.index(stop_tok)
    out = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                   stop_token_ids=(stop_tok,)))[0]
    assert out.token_ids == ids[: first + 1] and out.finish_reason == "stop"
    assert out.stop_reason == stop_tok
    # stop string: text is cut before it
    text = tok.decode(ids)
    stop = text[6:8]
    out = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                   stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    assert out.stop_reason == stop
    # max_tokens and max_model_len
    out = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == ids[:3] and out.finish_reason == "length"
    long_prompt = _prompts(cfg, [60])[0]
    out = engine.generate([long_prompt], SamplingParams(max_tokens=50, temperature=0,
                                                        ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_streamed_deltas_add_up_to_text(model):
    cfg, variables = model
    tok = CharTokenizer()
    engine = Engine(cfg, variables, tok, EngineConfig(max_num_seqs=2, max_model_len=64, page_size=8,
                                                      num_speculative_tokens=2))
    prompt = _prompts(cfg, [9])[0]
    rid = engine.add_request(prompt, SamplingParams(max_tokens=14, temperature=0.8, seed=1,
                                                    ignore_eos=True, logprobs=2))
    deltas, ids, lps = [], [], []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            deltas.append(out.delta_text)
            ids += out.new_token_ids
            lps += out.logprobs
            final = out
    assert final.finished and final.token_ids == ids and len(ids) == 14
    assert "".join(deltas) == final.text == tok.decode(ids)
    assert len(lps) == 14 and all(len(lp.top) == 2 and lp.logprob <= 0 for lp in lps)


def test_abort_and_bad_requests(model):
    cfg, variables = model
    engine = Engine(cfg, variables, None, EngineConfig(max_num_seqs=2, max_model_len=32, page_size=8))
    total = engine.stats().total_pages
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    assert engine.stats().free_pages < total
    engine.abort(rid)
    assert engine.stats().free_pages == total and not engine.has_unfinished()
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(3, 35)), SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="300"):
        engine.add_request([300], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request([5], SamplingParams(temperature=-1.0))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        Engine(cfg, variables, None, EngineConfig(num_speculative_tokens=9))


def _forcing(target, vocab_size):
    """A logits processor that bans every token but target[len(generated)]."""
    calls = []

    def processor(generated):
        calls.append(list(generated))
        bias = np.full((vocab_size,), -np.inf, np.float32)
        bias[target[len(generated)]] = 0.0
        return bias

    return processor, calls


@pytest.mark.parametrize("k", [0, 2])
def test_logits_processor_forces_tokens(model, workload, k):
    cfg, variables = model
    prompts, want = workload
    engine = Engine(cfg, variables, None, EngineConfig(  # as above: shares compiled shapes
        max_num_seqs=4, max_model_len=96, page_size=8, prefill_chunk=16, max_prefill_seqs=2,
        num_speculative_tokens=k))
    target = [7, 7, 100, 3, 250, 9, 42, 42, 5, 6]
    assert target != want[0]
    runs = []
    for params in (GREEDY, SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1,
                                          ignore_eos=True, logprobs=1)):
        processor, calls = _forcing(target, cfg.vocab_size)
        forced = engine.add_request(prompts[0], params, logits_processor=processor)
        free = engine.add_request(prompts[0], GREEDY)  # same prompt, no processor, same batch
        outs = {}
        while engine.has_unfinished():
            for out in engine.step():
                outs.setdefault(out.request_id, []).append(out)
        assert outs[forced][-1].token_ids == target
        # Called once per token with that sequence's tokens so far (no speculation past it).
        assert calls == [target[:i] for i in range(len(target))]
        assert outs[free][-1].token_ids == want[0]
        runs.append(outs[forced])
    # Logprobs are those of the biased distribution: the only allowed token has probability 1.
    lps = [lp for out in runs[1] for lp in out.logprobs]
    assert [lp.token_id for lp in lps] == target
    assert all(lp.logprob == 0.0 and lp.top[0] == (lp.token_id, 0.0) for lp in lps)
    stats = engine.stats()
    assert stats.free_pages == stats.total_pages

    if k:
        return
    # A processor that fails (here: a wrong shape on its third token) finishes only its request.
    def bad(generated):
        return np.zeros((3,), np.float32) if len(generated) == 2 else None

    bad_id = engine.add_request(prompts[0], GREEDY, logits_processor=bad)
    good_id = engine.add_request(prompts[0], GREEDY)
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals[bad_id].finish_reason == "error" and "shape (3,)" in finals[bad_id].error
    assert finals[bad_id].token_ids == want[0][:2]  # bias None: unconstrained greedy tokens
    assert finals[good_id].token_ids == want[0]
