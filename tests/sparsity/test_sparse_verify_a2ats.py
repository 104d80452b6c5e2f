"""Sparse verification over A²ATS retrieval: the shared-selection attention against a numpy
reference (fast), the engine pairing rules, and engine greedy output with every key retrieved
equal to dense verification (slow)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from lcjax.config import LozaConfig, RopeConfig
from lcjax.ops import attention as attention_op
from lcjax.serve.engine_state import page_bounds_needed
from lcjax.sparsity import a2ats
from lcjax.sparsity.a2ats import A2ATSConfig
from lcjax.sparsity.a2ats_cache import RetrievalPagedCache
from lcjax.sparsity.sparse_verify import SparseVerifyConfig
from lcjax.sparsity.sparse_verify_retrieval import RetrievalSelector

ROPE = RopeConfig(type="default", theta=10000.0)
C, R, H, PAGE, NPAGES, S, SCALE = 6, 4, 3, 4, 14, 3, 0.3
TABLES = np.array([[3, 7, 1, 9, 11, 0, 0], [2, 5, 8, 4, 10, 6, 12]], np.int32)
CACHED = np.array([13, 23])  # tokens cached before the verify step, per row


def _attend(q, k, v, **kw):
    return attention_op.attention(q, k, v, layout=attention_op.CausalLayout(), scale=SCALE,
                                  implementation="reference", **kw)


def _layer(rng, cfg):
    """One full sublayer: random pages, codes, codebook; a verify step's queries and new rows."""
    cents = jnp.asarray(rng.normal(size=(8, C + R)), jnp.float32)
    book = a2ats.Codebook(centroids=cents, centroids_l=cents, transform=jnp.eye(C + R))
    view = RetrievalPagedCache(
        pages=jnp.asarray(rng.normal(size=(NPAGES, PAGE, C + R)), jnp.float32),
        codes=jnp.asarray(rng.integers(0, 8, (NPAGES, PAGE)), jnp.int16),
        block_tables=jnp.asarray(TABLES), book=book, kv_lora_rank=C, rope=ROPE, config=cfg,
        all_valid=True)
    q = jnp.asarray(rng.normal(size=(2, S, H, C + R)), jnp.float32)
    new = [jnp.asarray(rng.normal(size=(2, S, n)), jnp.float32) for n in (C, R)]
    return view, q, new


def _reference_set(cache, q, positions, cfg, score_query):
    """Per row: numpy A²ATS selection of the score query (sinks + window + per-head top-k by
    code scores, ties to the earlier key) plus the verify positions."""
    t = TABLES.shape[1] * PAGE
    codes = np.asarray(cache.codes)[TABLES].reshape(2, t)
    q_hat = np.asarray(a2ats.wrope_queries(q, positions, R, ROPE, cfg.wrope_position))
    cents = np.asarray(cache.book.centroids)
    out = []
    for b in range(2):
        p = int(positions[b, score_query])
        kv = np.arange(t)
        seen = kv <= p
        exact = seen & ((kv < cfg.sink_tokens) | (kv > p - cfg.local_window))
        chosen = set(np.flatnonzero(exact))
        k = math.ceil(cfg.topk_fraction * (p + 1))
        for h in range(H):
            score = q_hat[b, score_query, h] @ cents[codes[b]].T
            cand = np.flatnonzero(seen & ~exact)
            order = cand[np.argsort(-score[cand], kind="stable")]
            chosen |= set(order[:k].tolist())
        out.append(chosen | set(np.asarray(positions[b]).tolist()))
    return out


def _reference_attention(cache, q, positions, keep):
    """Each verify token over the kept keys at or before it (values = the first C dims)."""
    t = TABLES.shape[1] * PAGE
    keys = np.asarray(cache.pages)[TABLES].reshape(2, t, C + R)
    out = np.zeros((2, S, H, C))
    for b in range(2):
        for j in range(S):
            idx = np.array(sorted(k for k in keep[b] if k <= int(positions[b, j])))
            logits = np.asarray(q[b, j]) @ keys[b, idx].T * SCALE  # [H, n]
            w = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, j] = (w / w.sum(-1, keepdims=True)) @ keys[b, idx, :C]
    return out


def test_shared_selection_matches_numpy_and_is_reused():
    """dense_first=1, reuse_layers=2, score_query=1 over four sublayers: call 0 attends every
    key, calls 1 and 3 retrieve by their own score query, call 2 reuses call 1's keys."""
    rng = np.random.default_rng(0)
    cfg = A2ATSConfig(topk_fraction=0.15, sink_tokens=2, local_window=3, wrope_position=8,
                      codebook_size=8)
    sel = RetrievalSelector(SparseVerifyConfig(dense_first=1, reuse_layers=2, score_query=1))
    positions = jnp.asarray(CACHED[:, None] + np.arange(S)[None, :], jnp.int32)
    valid = jnp.ones(positions.shape, bool)
    layers = [_layer(rng, cfg) for _ in range(4)]

    @jax.jit
    def run(layers):  # the four sublayers of one verify pass, traced in order
        outs = []
        for view, q, new in layers:
            out, cache = view.replace(share=sel).update_and_attend(
                q, new[0], new[1], positions, valid, sparse=False, loza=LozaConfig(),
                attend=_attend, scale=SCALE)
            outs.append((out, cache, sel.chosen))
        return outs

    kept_before = None
    for call, (out, cache, chosen) in enumerate(run(layers)):
        q = layers[call][1]
        if call == 0:
            keep = [set(range(int(positions[b, -1]) + 1)) for b in range(2)]
            assert chosen is None
        elif call == 2:
            keep = kept_before
        else:
            keep = _reference_set(cache, q, positions, cfg, score_query=1)
            assert all(len(k) < int(positions[b, -1]) + 1 for b, k in enumerate(keep))  # sparse
            kept_before = keep
        if call:
            assert [set(r[r >= 0].tolist()) for r in np.asarray(chosen)] == keep
        np.testing.assert_allclose(np.asarray(out), _reference_attention(cache, q, positions, keep),
                                   rtol=1e-4, atol=1e-5)
    assert sel.scored == [1, 3]
    # A gather cap still keeps every sink, window and verify position.
    capped = dataclasses.replace(cfg, max_gather_fraction=0.05)
    view, q, new = _layer(rng, capped)
    sel = RetrievalSelector(SparseVerifyConfig(reuse_layers=1))

    @jax.jit
    def retrieve(view, q, new):
        view.replace(share=sel).update_and_attend(q, new[0], new[1], positions, valid,
                                                  sparse=False, loza=LozaConfig(),
                                                  attend=_attend, scale=SCALE)
        return sel.chosen

    t = TABLES.shape[1] * PAGE
    for b, row in enumerate(np.asarray(retrieve(view, q, new))):
        got, p = set(row[row >= 0].tolist()), int(positions[b, 0])
        must = {k for k in range(p + 1) if k < 2 or k > p - 3} | set(np.asarray(positions[b]).tolist())
        assert must <= got and len(got) <= math.ceil(0.05 * t) + 2 + 3 + S


def test_page_bounds_rule_and_engine_pairing():
    """No page bounds under A²ATS; the engine takes sparse_verify with kv_retrieval and refuses
    kv_retrieval on a mesh with a message saying so."""
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve.engine import Engine, EngineConfig
    sv = SparseVerifyConfig()
    assert page_bounds_needed(sv, False) and not page_bounds_needed(sv, True)
    assert not page_bounds_needed(None, False)
    cfg = load_config(resolve_config_path("tiny"))

    class Index:  # stands in for an A2ATSIndex: records that the engine attached it
        attached = False
        config = A2ATSConfig()  # offload="none": the pools stay on the device

        def attach(self, cache, num_pages, page_size):
            Index.attached = True
            return cache

    engine = Engine(cfg, {}, None, EngineConfig(num_speculative_tokens=1, max_num_seqs=1,
                                                max_model_len=32, sparse_verify=sv),
                    kv_retrieval=Index())
    assert Index.attached and engine.state.cache.bounds == ()
    with pytest.raises(ValueError, match="one device"):
        Engine(cfg, {}, None, EngineConfig(), mesh=Mesh(np.array(jax.devices()[:1]), ("data",)),
               kv_retrieval=Index())


@pytest.mark.slow
@pytest.mark.parametrize("offload,quant", [("none", None), ("host", None), ("none", "w8a8")])
def test_engine_every_key_retrieved_equals_dense_verify(offload, quant):
    """Greedy, k=2, three requests over two slots (continuous batching): A²ATS with
    topk_fraction=1 plus sparse verification (one shared key set, reused by the next sublayer)
    gives the tokens, drafts and acceptances of exact dense verification, pages on the device
    or in host memory, float or quantized weights."""
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.loading import random_model
    from lcjax.serve.sampling import SamplingParams
    from lcjax.sparsity.a2ats_calibrate import calibrate
    from lcjax.sparsity.host_offload import host_memory_kind

    if offload == "host" and host_memory_kind() is None:
        pytest.skip("no pinned_host memory on this device")
    config, variables, _ = random_model(load_config(resolve_config_path("tiny")), seed=0)
    if quant is not None:
        from lcjax.quant.apply import quantize_model
        variables = quantize_model(variables, config, quant)
    toks = jax.random.randint(jax.random.key(1), (1, 64), 3, config.model.vocab_size)
    index = calibrate(config.model, variables, [toks],
                      A2ATSConfig(codebook_size=16, sink_tokens=2, local_window=4,
                                  wrope_position=16, kmeans_iters=5))
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(3, 256, n)] for n in (45, 13, 70)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    base = dict(max_num_seqs=2, max_model_len=96, page_size=4, prefill_chunk=32,
                num_speculative_tokens=2)
    results = []
    for spec, retrieval in ((None, None), (SparseVerifyConfig(reuse_layers=2),
                                           index.with_config(topk_fraction=1.0, offload=offload))):
        engine = Engine(config, variables, None, EngineConfig(**base, sparse_verify=spec),
                        kv_retrieval=retrieval)
        outs = engine.generate(prompts, params)
        stats = engine.stats()
        results.append(([o.token_ids for o in outs], stats.draft_tokens_total,
                         stats.accepted_tokens_total))
    assert results[0][1] > 0 and results[1] == results[0]
    assert engine.state.cache.bounds == ()


def test_cli_refuses_page_keys_with_a2ats(capsys):
    from lcjax.serve import cli
    base = ["--num-speculative-tokens", "2", "--kv-retrieval", "a2ats"]
    with pytest.raises(SystemExit):
        cli.main(base + ["--sparse-verify", "reuse_layers=2,block_budget=16"])
    assert "block_budget=16" in capsys.readouterr().err
    args = cli.build_parser().parse_args(base + ["--sparse-verify", "reuse_layers=2,score_query=1"])
    cli.retrieval_flags.check_flags(args, cli.build_parser())  # the keys that apply pass
