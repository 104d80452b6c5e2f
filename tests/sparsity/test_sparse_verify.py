"""Sparse verification: page bounds, Quest scores, selection and the sparse paged attend against
plain numpy; with every page kept the engine's greedy output and acceptance equal dense verify."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config import LozaConfig
from lcjax.serve.kv_cache import PagedLayerCache
from lcjax.sparsity import sparse_verify as sv


def _written_cache(rng, num_pages=14, page=4, width=6, length=22, batch=2):
    """Two rows with distinct pages, filled to `length` tokens in uneven chunks (bounds kept)."""
    n = num_pages // batch
    tables = rng.permutation(np.arange(num_pages))[: batch * n].reshape(batch, n)
    cache = PagedLayerCache(pages=jnp.zeros((num_pages, page, width)), block_tables=jnp.asarray(tables),
                            kv_lora_rank=width - 2, bounds=jnp.zeros((num_pages, 2, width)))
    tokens = rng.normal(size=(batch, length + 8, width)).astype(np.float32)  # + room for drafts
    start = 0
    for chunk in (5, 1, 7, 3, length):
        end = min(start + chunk, length)
        if end <= start:
            break
        pos = np.broadcast_to(np.arange(start, end), (batch, end - start))
        cache = cache.write(jnp.asarray(tokens[:, start:end, :-2]), jnp.asarray(tokens[:, start:end, -2:]),
                            jnp.asarray(pos, jnp.int32), jnp.ones(pos.shape, bool))
        start = end
    return cache, tables, tokens


def test_bounds_are_page_min_max_and_forget_rejected_tokens():
    rng = np.random.default_rng(0)
    cache, tables, tokens = _written_cache(rng)
    page = 4

    def check(cache, length):
        bounds = np.asarray(cache.bounds)
        for b in range(2):
            for p in range(-(-length // page)):
                rows = tokens[b, p * page: min((p + 1) * page, length)]
                np.testing.assert_allclose(bounds[tables[b, p], 0], rows.min(0), rtol=0, atol=0)
                np.testing.assert_allclose(bounds[tables[b, p], 1], rows.max(0), rtol=0, atol=0)

    check(cache, 22)
    # A verify round wrote drafts at 22..24 (page 5 starts at 20); all were rejected and the next
    # round writes from 22 again with new tokens: the bounds hold no trace of the rejected ones.
    drafts = rng.normal(size=(2, 3, 6)).astype(np.float32) * 10
    pos = jnp.asarray(np.broadcast_to(np.arange(22, 25), (2, 3)), jnp.int32)
    cache = cache.write(jnp.asarray(drafts[..., :-2]), jnp.asarray(drafts[..., -2:]), pos, jnp.ones((2, 3), bool))
    tokens[:, 22:24] = rng.normal(size=(2, 2, 6))
    pos = jnp.asarray(np.broadcast_to(np.arange(22, 24), (2, 2)), jnp.int32)
    cache = cache.write(jnp.asarray(tokens[:, 22:24, :-2]), jnp.asarray(tokens[:, 22:24, -2:]), pos,
                        jnp.ones((2, 2), bool))
    check(cache, 24)


def test_page_scores_bound_every_key_and_match_numpy():
    rng = np.random.default_rng(1)
    cache, tables, tokens = _written_cache(rng)
    q = rng.normal(size=(2, 3, 6)).astype(np.float32)  # [B, H, W]
    bounds = np.asarray(cache.bounds)[tables]  # [B, N, 2, W]
    got = np.asarray(sv.page_scores(jnp.asarray(q), jnp.asarray(bounds), "max"))
    lo, hi = bounds[:, :, 0], bounds[:, :, 1]
    want = np.maximum(q[:, :, None] * lo[:, None], q[:, :, None] * hi[:, None]).sum(-1).max(1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for b in range(2):
        for p in range(-(-22 // 4)):
            keys = tokens[b, p * 4: min(p * 4 + 4, 22)]
            assert (q[b] @ keys.T).max() <= got[b, p] + 1e-5


def _numpy_sparse_attend(q, tokens, length, kept_tokens, c, scale):
    """softmax over the kept positions (causal inside the verify block), values = first c dims."""
    batch, s_len = q.shape[:2]
    out = np.zeros(q.shape[:3] + (c,), np.float32)
    for b in range(batch):
        for i in range(s_len):
            q_pos = length - s_len + i
            keys = [t for t in kept_tokens[b] if t <= q_pos]
            logits = np.einsum("HW,TW->HT", q[b, i], tokens[b, keys]) * scale
            w = np.exp(logits - logits.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[b, i] = w @ tokens[b, keys, :c]
    return out


@pytest.mark.parametrize("budget,impl", [(4, "xla"), (5, "xla"), (0, "xla"),
                                         (4, "pallas_gpu_interpret")])
def test_sparse_attend_matches_numpy_selection(budget, impl):
    """The paged decode backends (the Pallas GPU kernel interpreted too) on the compressed
    block table equal numpy attention over the pages numpy's Quest selection keeps."""
    rng = np.random.default_rng(2)
    page, length, s_len = 4, 22, 3
    cache, tables, tokens = _written_cache(rng, length=length - s_len)
    cfg = sv.SparseVerifyConfig(block_budget=budget, sink_blocks=1, local_blocks=1)
    new = rng.normal(size=(2, s_len, 6)).astype(np.float32)
    tokens[:, length - s_len: length] = new
    q = rng.normal(size=(2, s_len, 3, 6)).astype(np.float32)
    pos = jnp.asarray(np.broadcast_to(np.arange(length - s_len, length), (2, s_len)), jnp.int32)
    view = dataclasses.replace(cache, all_valid=True, implementation=impl, select=sv.Selector(cfg))
    got, _ = view.update_and_attend(jnp.asarray(q), jnp.asarray(new[..., :-2]), jnp.asarray(new[..., -2:]),
                                    pos, jnp.ones((2, s_len), bool), sparse=False, loza=LozaConfig(),
                                    attend=lambda *a, **k: None, scale=0.5)
    # numpy: bounds over the 6 used pages, query 0 scores, sink page 0 + pages 4..5 (the local
    # page and the verify tokens' pages) forced, best of the rest up to the budget.
    used = -(-length // page)
    kept = []
    for b in range(2):
        scores = []
        for p in range(used):
            rows = tokens[b, p * page: min(p * page + page, length)]
            lo, hi = rows.min(0), rows.max(0)
            scores.append(np.maximum(q[b, 0] * lo, q[b, 0] * hi).sum(-1).max())
        forced = {0, 4, 5}
        rest = sorted((p for p in range(used) if p not in forced), key=lambda p: -scores[p])
        pages = forced | set(rest[: max(0, (budget or used) - len(forced))])
        kept.append([t for p in sorted(pages) for t in range(p * page, min(p * page + page, length))])
    want = _numpy_sparse_attend(q, tokens, length, kept, 4, 0.5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    dense = _numpy_sparse_attend(q, tokens, length, [list(range(length))] * 2, 4, 0.5)
    assert np.allclose(want, dense, atol=1e-4) == (budget in (0, 6))


def test_reuse_and_dense_first_schedule():
    cfg = sv.SparseVerifyConfig(block_budget=3, sink_blocks=1, local_blocks=1, reuse_layers=2,
                                dense_first=1)
    sel = sv.Selector(cfg, record=True)
    rng = np.random.default_rng(3)
    tables = jnp.asarray(np.arange(8)[None], jnp.int32)
    lengths = jnp.asarray([30], jnp.int32)
    bounds = jnp.asarray(np.sort(rng.normal(size=(8, 2, 5)), axis=1), jnp.float32)
    q = jnp.asarray(rng.normal(size=(1, 2, 2, 5)), jnp.float32)
    outs = [sel(q * (i + 1) * (-1) ** i, bounds, tables, lengths, 4) for i in range(4)]
    assert outs[0][0].shape == (1, 8) and int(outs[0][1][0]) == 30  # dense first
    assert outs[1][0].shape == (1, 3) and np.array_equal(outs[1][0], outs[2][0])  # reused
    assert len(sel.token_overlap) == 2 and len(sel.layer_overlap) == 1
    # compressed length: pages 0, x, 7 kept; the last page holds 30 - 28 = 2 tokens.
    assert int(outs[1][1][0]) == 2 * 4 + 2


def test_jaccard_and_settings():
    a = jnp.asarray([[1, 2, 3, -1]])
    b = jnp.asarray([[2, 3, 4, 5]])
    np.testing.assert_allclose(sv.jaccard(a, b, 8), [2 / 5])
    assert float(sv.jaccard(jnp.asarray([[-1]]), jnp.asarray([[-1]]), 4)[0]) == 1.0
    cfg = sv.parse_settings("block_budget=32,reuse_layers=3,moe_rule=first_token")
    assert (cfg.block_budget, cfg.reuse_layers, cfg.moe_rule) == (32, 3, "first_token")
    with pytest.raises(ValueError, match="block_budget"):
        sv.parse_settings("budget=3")
    with pytest.raises(ValueError, match="reuse_layers"):
        sv.SparseVerifyConfig(reuse_layers=0)
    sv.SparseVerifyConfig(block_budget=3, local_blocks=2).check(4, 4)  # 1 sink + 2 local
    with pytest.raises(ValueError, match="block_budget=3"):
        sv.SparseVerifyConfig(block_budget=3, local_blocks=1).check(6, 4)  # 6 tokens span 3 pages


def test_cli_flag():
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve import cli

    parser = cli.build_parser()
    args = parser.parse_args(["--sparse-verify", "block_budget=32,reuse_layers=4",
                              "--num-speculative-tokens", "2"])
    ec = cli.engine_config(args, load_config(resolve_config_path("tiny")))
    assert ec.sparse_verify == sv.SparseVerifyConfig(block_budget=32, reuse_layers=4)
    assert cli.engine_config(parser.parse_args([]), load_config(resolve_config_path("tiny"))
                             ).sparse_verify is None
    for bad in (["--sparse-verify", "budget=3", "--num-speculative-tokens", "2"],
                ["--sparse-verify"]):
        with pytest.raises(SystemExit):
            cli.main(bad)


@pytest.mark.slow
def test_everything_budget_engine_equals_dense_verify():
    """Greedy, k=2, page 4: with every page kept (budget 0, or the block-table width) tokens,
    drafts and acceptances equal dense verification token for token."""
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.loading import random_model
    from lcjax.serve.sampling import SamplingParams

    config, variables, _ = random_model(load_config(resolve_config_path("tiny")), seed=0)
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(3, 256, n)] for n in (45, 70)]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    base = dict(max_num_seqs=2, max_model_len=96, page_size=4, prefill_chunk=64,
                num_speculative_tokens=2)
    width = EngineConfig(**base).pages_per_seq
    results = []
    for spec in (None, sv.SparseVerifyConfig(block_budget=0),
                 sv.SparseVerifyConfig(block_budget=width, reuse_layers=2)):
        engine = Engine(config, variables, None, EngineConfig(**base, sparse_verify=spec))
        outs = engine.generate(prompts, params)
        stats = engine.stats()
        results.append(([o.token_ids for o in outs], stats.draft_tokens_total,
                         stats.accepted_tokens_total))
    assert results[0][1] > 0
    assert results[1] == results[0] and results[2] == results[0]


@pytest.mark.slow
def test_everything_budget_quantized_staggered_equals_dense():
    """w8a8 weights, a request joining a running one (continuous batching): budget 0 with the
    first_token MoE rule off equals dense verify token for token; a small budget still runs."""
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.quant.apply import quantize_model
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.loading import random_model
    from lcjax.serve.sampling import SamplingParams

    config, variables, _ = random_model(load_config(resolve_config_path("tiny")), seed=1)
    variables = quantize_model(variables, config, "w8a8")
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 256, n)] for n in (60, 33)]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    results = []
    for spec in (None, sv.SparseVerifyConfig(block_budget=0),
                 sv.SparseVerifyConfig(block_budget=4, local_blocks=2)):
        engine = Engine(config, variables, None, EngineConfig(
            max_num_seqs=2, max_model_len=96, page_size=4, prefill_chunk=16,
            num_speculative_tokens=2, sparse_verify=spec))
        ids, finals = [engine.add_request(prompts[0], params)], {}
        for it in range(200):
            if it == 6:
                ids.append(engine.add_request(prompts[1], params))
            finals.update({o.request_id: o for o in engine.step() if o.finished})
            if len(finals) == 2:
                break
        results.append([finals[i].token_ids for i in ids])
    assert results[1] == results[0]
    assert [len(t) for t in results[2]] == [10, 10]
