"""A²ATS in the serve engine: the paged retrieval view against the exact paged cache and the
dense selection (fast), and greedy engine output with retrieval = everything equal to exact
decoding under continuous batching, host offload, MTP speculation and quantized weights (slow)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config import LozaConfig, RopeConfig
from lcjax.ops import attention as attention_op
from lcjax.serve.kv_cache import PagedLayerCache
from lcjax.sparsity import a2ats
from lcjax.sparsity.a2ats import A2ATSConfig
from lcjax.sparsity.a2ats_cache import RetrievalPagedCache
from lcjax.sparsity.host_offload import host_memory_kind, to_host

ROPE = RopeConfig(type="default", theta=10000.0)
C, R, H, PAGE, NPAGES = 6, 4, 3, 4, 12


def _attend(q, k, v, **kw):
    return attention_op.attention(q, k, v, layout=attention_op.CausalLayout(), scale=0.3,
                                  implementation="reference", **kw)


def _setup(frac, host=False, seed=0):
    """Two rows with 13 and 22 cached tokens on shuffled pages, a random codebook."""
    rng = np.random.default_rng(seed)
    pages = jnp.asarray(rng.normal(size=(NPAGES, PAGE, C + R)), jnp.float32)
    tables = jnp.asarray([[3, 7, 1, 9, 0, 0], [2, 5, 8, 4, 10, 6]], jnp.int32)
    lengths = np.array([13, 22])
    book = a2ats.build_codebook(jnp.asarray(rng.normal(size=(64, C + R)), jnp.float32),
                                jnp.asarray(rng.normal(size=(64, C + R)), jnp.float32),
                                A2ATSConfig(codebook_size=8, kmeans_iters=5), jax.random.PRNGKey(0))
    cfg = A2ATSConfig(topk_fraction=frac, sink_tokens=2, local_window=3, wrope_position=8,
                      codebook_size=8)
    codes = jnp.asarray(rng.integers(0, 8, (NPAGES, PAGE)), jnp.int16)
    view = RetrievalPagedCache(pages=to_host(pages) if host else pages, codes=codes,
                               block_tables=tables, book=book, kv_lora_rank=C, rope=ROPE,
                               config=cfg, all_valid=True)
    exact = PagedLayerCache(pages=pages, block_tables=tables, kv_lora_rank=C, all_valid=False)
    new = [jnp.asarray(rng.normal(size=(2, 1, n)), jnp.float32) for n in (C, R)]
    q = jnp.asarray(rng.normal(size=(2, 1, H, C + R)), jnp.float32)
    positions = jnp.asarray(lengths[:, None], jnp.int32)
    return view, exact, q, new, positions


def _call(cache, q, new, positions):
    return cache.update_and_attend(q, new[0], new[1], positions, jnp.ones(positions.shape, bool),
                                   sparse=False, loza=LozaConfig(), attend=_attend, scale=0.3)


@pytest.mark.parametrize("host", [False, True])
def test_everything_equals_exact_paged_attention(host):
    if host and host_memory_kind() is None:
        pytest.skip("no pinned_host memory on this device")
    view, exact, q, new, positions = _setup(1.0, host)
    out, cache = _call(view, q, new, positions)
    ref, ref_cache = _call(exact, q, new, positions)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.pages), np.asarray(ref_cache.pages))
    if host:
        assert cache.pages.sharding.memory_kind == "pinned_host"
    # The new tokens' codes are their nearest centroids (pre-RoPE keys, query-aware distance).
    row = jnp.concatenate(new, -1)
    hat = a2ats.prerope_keys(row, positions, R, ROPE)
    flat = np.asarray(cache.block_tables)[[0, 1], np.asarray(positions)[:, 0] // PAGE]
    got = np.asarray(cache.codes)[flat, np.asarray(positions)[:, 0] % PAGE]
    np.testing.assert_array_equal(got, np.asarray(a2ats.assign_codes(view.book, hat))[:, 0])


def test_retrieved_rows_are_the_dense_selection():
    """select() lists exactly the keys selection_mask marks, and attention over the gathered
    rows equals the dense masked reference."""
    view, exact, q, new, positions = _setup(0.2)
    out, cache = _call(view, q, new, positions)
    t = cache.block_tables.shape[1] * PAGE
    kv_pos = jnp.where(jnp.arange(t)[None] <= positions, jnp.arange(t)[None], -1)
    keys = cache.pages[cache.block_tables].reshape(2, t, C + R)
    codes = cache.codes[cache.block_tables].reshape(2, t)
    q_hat = a2ats.wrope_queries(q, positions, R, ROPE, view.config.wrope_position)
    mask = a2ats.selection_mask(view.config, a2ats.approx_scores(view.book, q_hat, codes),
                                positions, kv_pos)
    selected = np.asarray(cache.select(q, positions, kv_pos))
    for b in range(2):
        assert sorted(selected[b][selected[b] >= 0]) == list(np.flatnonzero(np.asarray(mask[b, 0])))
        assert 0 < (selected[b] >= 0).sum() < int(positions[b, 0]) + 1  # a strict subset
    np.testing.assert_allclose(out, a2ats.masked_attention(q, keys, mask, 0.3, C), rtol=1e-5, atol=1e-5)


def test_gather_budget_keeps_sinks_window_and_the_best_ranked_keys():
    """With max_gather_fraction the step gathers at most ceil(f * T) + sinks + window rows:
    every sink and window key, then the union's keys by their best head's relative score."""
    import dataclasses
    view, _, q, new, positions = _setup(0.5)
    view = view.replace(config=dataclasses.replace(view.config, max_gather_fraction=0.2))
    out, cache = _call(view, q, new, positions)
    t = cache.block_tables.shape[1] * PAGE
    kv_pos = jnp.where(jnp.arange(t)[None] <= positions, jnp.arange(t)[None], -1)
    codes = cache.codes[cache.block_tables].reshape(2, t)
    q_hat = a2ats.wrope_queries(q, positions, R, ROPE, view.config.wrope_position)
    scores = np.asarray(a2ats.approx_scores(view.book, q_hat, codes))
    union = np.asarray(a2ats.selection_mask(view.config, jnp.asarray(scores), positions, kv_pos))[:, 0]
    exact = np.asarray(a2ats.always_exact(view.config, positions, kv_pos))[:, 0]
    selected = np.asarray(cache.select(q, positions, kv_pos))
    cap = math.ceil(0.2 * t) + view.config.sink_tokens + view.config.local_window
    for b in range(2):
        got = set(selected[b][selected[b] >= 0].tolist())
        assert len(got) == min(cap, union[b].sum())
        assert set(np.flatnonzero(exact[b])) <= got <= set(np.flatnonzero(union[b]))
        valid = np.asarray(kv_pos[b]) >= 0
        rel = np.where(valid, scores[b, 0], -np.inf)
        best = (rel - rel.max(-1, keepdims=True)).max(0)
        rest = [k for k in np.flatnonzero(union[b] & ~exact[b])]
        kept = sorted(rest, key=lambda k: -best[k])[: len(got) - exact[b].sum()]
        assert got == set(np.flatnonzero(exact[b])) | set(kept)
    # The dense evaluation path applies the same cap per query.
    dense = np.asarray(a2ats.cap_selection(view.config, jnp.asarray(scores), jnp.asarray(union[:, None]),
                                           positions, kv_pos))[:, 0]
    for b in range(2):
        assert set(np.flatnonzero(dense[b])) == set(selected[b][selected[b] >= 0].tolist())
    keys = cache.pages[cache.block_tables].reshape(2, t, C + R)
    mask = np.zeros((2, 1, t), bool)
    for b in range(2):
        mask[b, 0, selected[b][selected[b] >= 0]] = True
    np.testing.assert_allclose(out, a2ats.masked_attention(q, keys, jnp.asarray(mask), 0.3, C),
                               rtol=1e-5, atol=1e-5)


def test_host_memory_kind_is_reported():
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    assert host_memory_kind() == ("pinned_host" if "pinned_host" in kinds else None)


# ----------------------------------------------------------------------------- engine (slow)
@functools.lru_cache(maxsize=1)
def _tiny():
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve.loading import random_model
    from lcjax.sparsity.a2ats_calibrate import calibrate
    cfg, variables, _ = random_model(load_config(resolve_config_path("tiny")), seed=0)
    toks = jax.random.randint(jax.random.key(1), (1, 64), 3, cfg.model.vocab_size)
    index = calibrate(cfg.model, variables, [toks],
                      A2ATSConfig(codebook_size=16, sink_tokens=2, local_window=4,
                                  wrope_position=16, kmeans_iters=5))
    return cfg, variables, index


@pytest.mark.slow
@pytest.mark.parametrize("case", ["batching", "host_offload", "mtp_host", "w4a16"])
def test_engine_greedy_with_everything_retrieved_equals_exact(case):
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.sampling import SamplingParams
    cfg, variables, index = _tiny()
    if case == "w4a16":
        from lcjax.quant.apply import quantize_model
        variables = quantize_model(variables, cfg, "w4a16:group_size=8")
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, 250, n))) for n in (40, 13, 70)]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ec = EngineConfig(max_num_seqs=2, max_model_len=128, prefill_chunk=32,
                      num_speculative_tokens=2 if case == "mtp_host" else 0)
    offload = "host" if case in ("host_offload", "mtp_host") else "none"
    ref = [o.token_ids for o in Engine(cfg, variables, None, ec).generate(prompts, greedy)]
    engine = Engine(cfg, variables, None, ec,
                    kv_retrieval=index.with_config(topk_fraction=1.0, offload=offload))
    assert [o.token_ids for o in engine.generate(prompts, greedy)] == ref
    full = [i for i, b in enumerate(index.books) if b is not None]
    assert engine.state.cache.layers[full[0]].sharding.memory_kind == (
        "pinned_host" if offload == "host" else "device")
    assert engine.stats().free_pages == engine.stats().total_pages


@pytest.mark.slow
def test_teacher_forced_evaluation_with_everything_equals_exact():
    """evaluate(): NLL with every key retrieved equals exact attention; recall is then 1, and
    below 1 with a 10% budget."""
    from lcjax.sparsity.a2ats_calibrate import evaluate
    cfg, variables, index = _tiny()
    toks = jax.random.randint(jax.random.key(3), (1, 96), 3, cfg.model.vocab_size)
    exact = evaluate(cfg.model, variables, toks, None)
    every = evaluate(cfg.model, variables, toks, index.with_config(topk_fraction=1.0))
    np.testing.assert_allclose(every["nll"], exact["nll"], rtol=1e-5, atol=1e-5)
    assert all(np.allclose(r, 1.0, atol=1e-5) for r in every["recall"].values())
    some = evaluate(cfg.model, variables, toks, index.with_config(topk_fraction=0.1))
    assert all(float(np.asarray(r)[0, 40:].mean()) < 0.999 for r in some["recall"].values())
