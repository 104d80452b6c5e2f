"""Hashed N-gram ids against a plain-Python reference; Embedder against a float64 NumPy reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from lcjax.config import MLAConfig, ModelConfig, MoEConfig, NgramConfig
from lcjax.model import embedding

# Jitted (config static) so each test compiles once instead of dispatching dozens of small ops;
# the root conftest's import hook type-checks the shapes at trace time.
ngram_ids = jax.jit(embedding.ngram_ids, static_argnums=3)
ngram_history = jax.jit(embedding.ngram_history, static_argnums=2)

EOS = 2
TINY = ModelConfig(
    vocab_size=64, hidden_size=24, num_layers=1, ffn_hidden_size=32,
    mla=MLAConfig(num_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
                  qk_rope_head_dim=4, v_head_dim=4),
    moe=MoEConfig(num_experts=4, num_zero_experts=2, top_k=2, expert_ffn_size=8),
    ngram=NgramConfig(enabled=True, vocab_size_ratio=3, neighbor_num=3, split_num=2),
    max_position_embeddings=64, eos_token_id=EOS)
# Full-size Flash-Lite hash (V = 2^17, m = 78 V, N = K = 4); the backbone is kept tiny.
LITE = dataclasses.replace(
    TINY, vocab_size=131072, hidden_size=24,
    ngram=NgramConfig(enabled=True, vocab_size_ratio=78, neighbor_num=4, split_num=4))


# ----------------------------------------------------------------------------- references
def ref_ids(tokens, config, segment_ids=None, history=None):
    """[J, B, S] ids with Python ints: walk back from each token until EOS / document change."""
    ng, vocab = config.ngram, config.vocab_size
    width = ng.neighbor_num - 1
    tokens = np.asarray(tokens)
    batch, seq = tokens.shape
    out = np.zeros((ng.num_tables, batch, seq), np.int64)
    for b in range(batch):
        hist = [0] * width if history is None else [int(v) for v in history[b]]
        ctx = hist + [int(v) for v in tokens[b]]
        seg = [0] * (width + seq) if segment_ids is None else (
            [int(segment_ids[b][0])] * width + [int(v) for v in segment_ids[b]])
        for t in range(seq):
            p = width + t
            h = [0] * (width + 1)  # h[delta]
            for delta in range(1, width + 1):
                q = p - delta
                if q < 0 or ctx[q] == config.eos_token_id or seg[q] != seg[q + 1]:
                    break
                h[delta] = ctx[q]
            for n in range(2, ng.neighbor_num + 1):
                for k in range(ng.split_num):
                    j = (n - 2) * ng.split_num + k
                    m = ng.vocab_size_ratio * vocab + 2 * j + 1
                    value = ctx[p] + sum(h[d] * (vocab ** d % m) for d in range(1, n))
                    out[j, b, t] = value % m
    return out


def ref_history(seq, config):
    """History after consuming the Python list `seq`: last N-1 tokens, zeroed through the last EOS."""
    width = config.ngram.neighbor_num - 1
    window = ([0] * width + list(seq))[-width:]
    eos_at = [i for i, v in enumerate(window) if v == config.eos_token_id]
    if eos_at:
        window = [0] * (eos_at[-1] + 1) + window[eos_at[-1] + 1:]
    return window


def unbox(tree):
    return meta.unbox(tree)


# ----------------------------------------------------------------------------- ids
def test_lite_moduli():
    moduli = embedding.ngram_moduli(LITE)
    assert moduli == tuple(10_223_617 + 2 * j for j in range(12))
    assert embedding.ngram_moduli(TINY) == (193, 195, 197, 199)


def test_disabled_ngram_ids_raise():
    cfg = dataclasses.replace(TINY, ngram=NgramConfig(enabled=False))
    with pytest.raises(ValueError, match="ngram.enabled"):
        embedding.ngram_ids(jnp.zeros((1, 4), jnp.int32), None, None, cfg)


def test_lite_ids_match_int_reference_without_x64():
    """Tokens near V-1 push x * (V^d mod M) to 2^41: any uint32 overflow shows up here."""
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, LITE.vocab_size, (3, 40))
    tokens[0, :6] = LITE.vocab_size - 1
    tokens[1, [0, 5, 6, 20, 22]] = EOS  # EOS at 0, consecutive EOS, EOS inside the 4-gram window
    tokens[2, -1] = EOS
    got = ngram_ids(jnp.asarray(tokens, jnp.int32), None, None, LITE)
    assert got.dtype == jnp.int32 and got.shape == (12, 3, 40)
    np.testing.assert_array_equal(np.asarray(got), ref_ids(tokens, LITE))
    # The first token of a sequence sees no history: the same row in every table.
    np.testing.assert_array_equal(np.asarray(got)[:, :, 0], np.broadcast_to(tokens[:, 0], (12, 3)))


@pytest.mark.parametrize("tokens", [
    [EOS, 5, 6, 7, 8, 9],  # EOS at position 0 ends a one-token segment
    [5, 6, EOS, EOS, 7, 8],  # consecutive EOS
    [5, 6, 7, EOS, 8, 9],  # EOS inside every window right after it
    [EOS, EOS, EOS, EOS, 1, 1],
])
def test_eos_cuts_history(tokens):
    x = np.asarray([tokens])
    got = np.asarray(ngram_ids(jnp.asarray(x, jnp.int32), None, None, LITE))
    np.testing.assert_array_equal(got, ref_ids(x, LITE))
    # The token right after an EOS hashes to itself in every table.
    for t in range(1, len(tokens)):
        if tokens[t - 1] == EOS:
            np.testing.assert_array_equal(got[:, 0, t], tokens[t])


def test_packed_segment_ids_cut_history():
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, LITE.vocab_size, (2, 24))
    tokens[0, 9] = EOS
    segs = np.array([[1] * 5 + [2] * 1 + [3] * 10 + [0] * 8,
                     [4] * 24])
    got = ngram_ids(jnp.asarray(tokens, jnp.int32), jnp.asarray(segs, jnp.int32), None, LITE)
    np.testing.assert_array_equal(np.asarray(got), ref_ids(tokens, LITE, segment_ids=segs))
    # A document's first token sees no history even without an EOS before it.
    np.testing.assert_array_equal(np.asarray(got)[:, 0, 5], tokens[0, 5])
    np.testing.assert_array_equal(np.asarray(got)[:, 0, 16], tokens[0, 16])


@pytest.mark.parametrize("config", [LITE, TINY], ids=["lite", "tiny"])
def test_history_counts_as_same_segment(config):
    rng = np.random.default_rng(2)
    width = config.ngram.neighbor_num - 1
    tokens = rng.integers(3, config.vocab_size, (3, 5))
    history = rng.integers(3, config.vocab_size, (3, width))
    history[1, 0] = 0  # absent oldest slot
    history[2, -1] = EOS  # a raw history ending in EOS: the EOS rule applies across it
    tokens[1, 2] = EOS
    segs = np.array([[7] * 5, [7] * 3 + [8] * 2, [1] * 5])
    got = ngram_ids(jnp.asarray(tokens, jnp.int32), jnp.asarray(segs, jnp.int32),
                    jnp.asarray(history, jnp.int32), config)
    want = ref_ids(tokens, config, segment_ids=segs, history=history)
    np.testing.assert_array_equal(np.asarray(got), want)
    # Raw history ending in EOS and its zeroed form give the same ids.
    zeroed = history.copy()
    zeroed[2] = 0
    got_zeroed = ngram_ids(jnp.asarray(tokens, jnp.int32), jnp.asarray(segs, jnp.int32),
                           jnp.asarray(zeroed, jnp.int32), config)
    np.testing.assert_array_equal(np.asarray(got_zeroed), np.asarray(got))


def test_bad_history_shape_raises():
    with pytest.raises(ValueError, match="history shape"):
        embedding.ngram_ids(jnp.zeros((2, 4), jnp.int32), None, jnp.zeros((2, 2), jnp.int32), LITE)


def test_ngram_history_matches_reference():
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, LITE.vocab_size, (5, 7))
    tokens[1, 4] = EOS  # last consumed token is EOS
    tokens[2, 1] = EOS  # EOS inside the window
    tokens[3, 2] = EOS  # EOS just before the window
    lengths = np.array([7, 5, 3, 6, 0])
    history = rng.integers(3, LITE.vocab_size, (5, 3))
    got = np.asarray(ngram_history(jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32),
                                   LITE, jnp.asarray(history, jnp.int32)))
    for b in range(5):
        seq = list(history[b]) + list(tokens[b, :lengths[b]])
        assert got[b].tolist() == ref_history(seq, LITE), b
    assert got[1].tolist() == [0, 0, 0]


def test_decode_via_history_equals_full_sequence():
    """Prefill right-padded prompts of different lengths, then decode token by token."""
    rng = np.random.default_rng(4)
    cfg = LITE
    prompts = [[9, 10, 11, 12, 13], [EOS, 20, 21], [30, 31, 32, EOS], [40]]
    decoded = rng.integers(3, cfg.vocab_size, (4, 8))
    decoded[0, 2] = EOS
    decoded[1, 3:5] = EOS
    decoded[3, 0] = EOS
    batch, plen = len(prompts), max(map(len, prompts))
    padded = np.zeros((batch, plen), np.int64)
    for b, p in enumerate(prompts):
        padded[b, :len(p)] = p
    lengths = np.array([len(p) for p in prompts])

    hist = ngram_history(jnp.asarray(padded, jnp.int32), jnp.asarray(lengths, jnp.int32), cfg)
    step_ids = []
    step = jax.jit(lambda x, h: (ngram_ids(x, None, h, cfg),
                                 ngram_history(x, jnp.ones((batch,), jnp.int32), cfg, h)))
    for t in range(decoded.shape[1]):
        ids, hist = step(jnp.asarray(decoded[:, t:t + 1], jnp.int32), hist)
        step_ids.append(np.asarray(ids)[:, :, 0])
    step_ids = np.stack(step_ids, axis=-1)  # [J, B, T]

    # Whole sequences, right-padded to one length (padding after a token cannot change its id).
    steps = decoded.shape[1]
    full = np.zeros((batch, plen + steps), np.int64)
    for b, p in enumerate(prompts):
        full[b, :len(p) + steps] = p + decoded[b].tolist()
    want_all = np.asarray(ngram_ids(jnp.asarray(full, jnp.int32), None, None, cfg))
    np.testing.assert_array_equal(want_all, ref_ids(full, cfg))
    for b, p in enumerate(prompts):
        np.testing.assert_array_equal(step_ids[:, b], want_all[:, b, len(p):len(p) + steps])


# ----------------------------------------------------------------------------- Embedder
def _abstract_params(config):
    """Boxed param ShapeDtypeStructs via eval_shape (no compile: CPU threefry compiles slowly)."""
    model = embedding.Embedder(config)
    return model, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


def _init(config, seed=0):
    """The Embedder and unboxed random params of its abstract shapes and dtypes."""
    model, abstract = _abstract_params(config)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), unbox(abstract))
    return model, params


def ref_embed(params, tokens, config, segment_ids=None, history=None):
    """float64 NumPy (E_tok[x] + sum_j T_j[id_j] @ P_j) / (1 + J), with ids from `ref_ids`."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), unbox(params))
    ids = ref_ids(tokens, config, segment_ids, history)
    total = p["tokens"]["embedding"][tokens]
    for j in range(ids.shape[0]):
        total = total + p["ngram"][f"table_{j}"][ids[j]] @ p["ngram"][f"proj_{j}"]
    return total / (1 + ids.shape[0]), ids


def test_param_names_shapes_and_axes():
    _, params = _abstract_params(TINY)
    assert set(params) == {"tokens", "ngram"}
    assert params["tokens"]["embedding"].names == ("vocab", "embed")
    assert unbox(params)["tokens"]["embedding"].shape == (64, 24)
    moduli = embedding.ngram_moduli(TINY)
    assert set(params["ngram"]) == ({f"table_{j}" for j in range(4)}
                                    | {f"proj_{j}" for j in range(4)})
    for j, m in enumerate(moduli):
        assert params["ngram"][f"table_{j}"].names == ("ngram_rows", "ngram_dim")
        assert params["ngram"][f"proj_{j}"].names == ("ngram_dim", "embed")
        assert params["ngram"][f"table_{j}"].value.shape == (m, TINY.ngram_table_dim)
        assert params["ngram"][f"proj_{j}"].value.shape == (TINY.ngram_table_dim, 24)


def test_embedder_matches_float64_reference():
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, TINY.vocab_size, (2, 12))
    tokens[0, [0, 4, 5]] = EOS
    segs = np.array([[0] * 12, [1] * 7 + [2] * 5])
    history = rng.integers(3, TINY.vocab_size, (2, 2))
    model, params = _init(TINY)
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens, jnp.int32),
                               jnp.asarray(segs, jnp.int32), jnp.asarray(history, jnp.int32))
    want, _ = ref_embed(params, tokens, TINY, segs, history)
    assert got.shape == (2, 12, 24) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


def test_embedder_gradient_matches_closed_form():
    """d/dparams of <out, w>: scatter-adds of w/13 (tokens), w P^T/13 (tables), T^T w/13 (projs)."""
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, TINY.vocab_size, (2, 10))
    tokens[1, :3] = [7, 7, EOS]  # repeated rows accumulate
    model, params = _init(TINY)
    w = rng.normal(size=(2, 10, 24))

    def loss(p):
        out = model.apply({"params": p}, jnp.asarray(tokens, jnp.int32))
        return jnp.sum(out * jnp.asarray(w, jnp.float32))

    grads = unbox(jax.jit(jax.grad(loss))(params))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), unbox(params))
    ids = ref_ids(tokens, TINY)
    scale = 1.0 / (1 + ids.shape[0])
    want_tok = np.zeros_like(p["tokens"]["embedding"])
    np.add.at(want_tok, tokens.reshape(-1), w.reshape(-1, 24) * scale)
    np.testing.assert_allclose(grads["tokens"]["embedding"], want_tok, rtol=1e-5, atol=1e-7)
    for j in range(ids.shape[0]):
        table, proj = p["ngram"][f"table_{j}"], p["ngram"][f"proj_{j}"]
        want_table = np.zeros_like(table)
        np.add.at(want_table, ids[j].reshape(-1), (w.reshape(-1, 24) @ proj.T) * scale)
        want_proj = table[ids[j].reshape(-1)].T @ w.reshape(-1, 24) * scale
        np.testing.assert_allclose(grads["ngram"][f"table_{j}"], want_table, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(grads["ngram"][f"proj_{j}"], want_proj, rtol=1e-5, atol=1e-7)


def test_disabled_ngram_is_plain_lookup():
    cfg = dataclasses.replace(TINY, ngram=NgramConfig(enabled=False))
    tokens = jnp.asarray([[0, 5, EOS, 63]], jnp.int32)
    model = embedding.Embedder(cfg)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]  # one real init
    assert set(params) == {"tokens"}
    got = jax.jit(model.apply)({"params": params}, tokens)
    np.testing.assert_array_equal(np.asarray(got),
                                  np.asarray(unbox(params)["tokens"]["embedding"])[np.asarray(tokens)])


def test_dtype_policy():
    cfg = dataclasses.replace(TINY, param_dtype="bfloat16", dtype="bfloat16")
    tokens = jnp.asarray([[1, 2, 3]], jnp.int32)
    model, params = _init(cfg)
    assert params["ngram"]["table_0"].dtype == jnp.bfloat16
    assert jax.jit(model.apply)({"params": params}, tokens).dtype == jnp.bfloat16


@pytest.mark.parametrize("bad", [
    np.zeros((2, 3), np.float32),  # float ids
    np.zeros((6,), np.int32),  # rank 1
    np.zeros((1, 2, 3), np.int32),  # rank 3
])
def test_bad_input_raises(bad):
    model, params = _init(TINY)
    with pytest.raises(ValueError, match="input_ids"):
        model.apply({"params": params}, jnp.asarray(bad))
