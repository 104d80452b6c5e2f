"""Cached decoding equals the full forward; LoZA sparse sublayers keep a constant-size cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.model import decode_step, init_cache, prefill

from .conftest import jitted_apply, tiny_config


def _tokens(cfg, batch, total, seed=0):
    ids = np.array(jax.random.randint(jax.random.key(seed), (batch, total), 3, cfg.vocab_size))
    for row, col in ((0, 3), (1, 20), (2, 30)):  # EOS in prompts and during decode
        ids[row, col % total] = cfg.eos_token_id
    return jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("chunk", [1, pytest.param(8, marks=pytest.mark.slow), 20])  # 20 > the sparse ring of 24 - 8 local slots
def test_prefill_and_decode_match_full_forward(tiny, chunk):
    cfg, variables = tiny
    lengths = np.array([5, 17, 26])
    total, max_len = 48, 64  # 48 > the LoZA window of 24 tokens: the ring wraps
    ids = _tokens(cfg, 3, total)
    full = jitted_apply(cfg)(variables, ids)

    prompt = np.array(ids[:, : lengths.max()])
    prompt[0, 5:] = 7  # padding garbage must not leak into row 0
    logits, cache = prefill(cfg, variables, jnp.asarray(prompt), jnp.asarray(lengths, jnp.int32), max_len)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=1e-5, rtol=0)

    step = jax.jit(decode_step, static_argnums=0)
    rows = np.arange(3)[:, None]
    for start in range(0, (total - lengths.max()) // chunk * chunk, chunk):
        pos = lengths[:, None] + start + np.arange(chunk)[None, :]
        logits, cache = step(cfg, variables, cache, ids[rows, pos])
        np.testing.assert_allclose(logits, full[rows, pos], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cache.lengths, lengths + start + chunk)


def test_sparse_layer_cache_is_constant_in_context_length(tiny):
    cfg, _ = tiny
    window = cfg.loza.cache_tokens  # sink + local blocks + one spare block
    small, large = init_cache(cfg, 2, 64), init_cache(cfg, 2, 512)
    for sparse, a, b in zip(cfg.sparse_layers, small.layers, large.layers):
        if sparse:
            assert a.capacity == b.capacity == window
        else:
            assert (a.capacity, b.capacity) == (64, 512)
        # The cache holds the latent (C) and one rope key (R) per token, never expanded heads.
        assert a.latent.shape[-1] == cfg.mla.kv_lora_rank
        assert a.k_rope.shape[-1] == cfg.mla.qk_rope_head_dim


def test_sparse_ring_holds_sink_and_newest_local_positions(tiny):
    cfg, variables = tiny
    ids = _tokens(cfg, 3, 40, seed=1)
    lengths = jnp.asarray([40, 30, 9], jnp.int32)
    _, cache = prefill(cfg, variables, ids, lengths, 64)
    sink = cfg.loza.sink_blocks * cfg.loza.block_size
    sparse_cache = cache.layers[cfg.sparse_layers.index(True)]
    local = sparse_cache.capacity - sink  # the ring: local blocks + one spare block
    for b, n in enumerate(np.asarray(lengths)):
        held = sorted(p for p in np.asarray(sparse_cache.slot_pos[b]) if p >= 0)
        want = sorted(set(range(min(n, sink))) | set(range(max(sink, n - local), n)))
        assert held == want


@pytest.mark.slow  # compiles the unrolled model's prefill and decode
def test_unrolled_layers_decode_too(tiny):
    cfg, variables = tiny
    unrolled_cfg = tiny_config("model.scan_layers=false")
    unrolled = {col: {**{k: v for k, v in t.items() if k != "layers"},
                      **{f"layers_{i}": jax.tree.map(lambda a: a[i], t["layers"])
                         for i in range(cfg.num_layers)}} for col, t in variables.items()}
    ids = _tokens(cfg, 3, 12, seed=2)
    lengths = jnp.asarray([11, 11, 11], jnp.int32)
    _, cache = prefill(unrolled_cfg, unrolled, ids[:, :11], lengths, 16)
    logits, _ = decode_step(unrolled_cfg, unrolled, cache, ids[:, 11:])
    np.testing.assert_allclose(logits[:, 0], jitted_apply(cfg)(variables, ids)[:, 11], atol=1e-5)


def test_bad_decode_inputs_raise(tiny):
    cfg, variables = tiny
    with pytest.raises(ValueError, match="max_len"):
        init_cache(cfg, 1, cfg.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="exceeds the cache"):
        prefill(cfg, variables, jnp.zeros((1, 20), jnp.int32), jnp.asarray([20]), 16)
    with pytest.raises(ValueError, match="integer"):
        decode_step(cfg, variables, init_cache(cfg, 1, 16), jnp.zeros((1, 1), jnp.float32))
