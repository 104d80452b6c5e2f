"""A²ATS pieces against plain-numpy references: WRoPE, the query metric, k-means, codes,
approximate scores, selection and the masked attention (random inputs, tiny shapes)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config import RopeConfig
from lcjax.model.rope import apply_rope
from lcjax.sparsity import a2ats
from lcjax.sparsity.a2ats import A2ATSConfig

ROPE = RopeConfig(type="default", theta=10000.0)


def np_rotate(x, delta, theta=10000.0):
    """Rotate de-interleaved [evens | odds] rope vectors by delta positions (numpy, float64)."""
    r = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, r, 2) / r)
    ang = np.asarray(delta, np.float64)[..., None] * inv
    ang = ang[..., None, :]
    x1, x2 = x[..., : r // 2], x[..., r // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def test_rotate_matches_numpy_and_undoes_rope():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    delta = rng.integers(-100, 100, (2, 5))
    np.testing.assert_allclose(a2ats.rotate(jnp.asarray(x), jnp.asarray(delta), ROPE),
                               np_rotate(x.astype(np.float64), delta), atol=1e-5)
    # The cached k_rope (roped, de-interleaved) rotated back by its position is the pre-RoPE key
    # rotated by 0, i.e. apply_rope at position 0 (which only de-interleaves).
    pos = jnp.asarray(rng.integers(0, 300, (2, 5)), jnp.int32)
    roped = apply_rope(jnp.asarray(x), pos, ROPE)
    back = a2ats.rotate(roped, -pos, ROPE)
    np.testing.assert_allclose(back, apply_rope(jnp.asarray(x), jnp.zeros_like(pos), ROPE), atol=1e-4)


def test_wrope_score_is_exact_at_distance_w():
    """q̂·k̂ equals the exact roped score of a key exactly W positions before the query."""
    rng = np.random.default_rng(1)
    c, r, w = 6, 8, 37
    q = rng.normal(size=(1, 1, 2, c + r)).astype(np.float32)
    k = rng.normal(size=(1, 1, c + r)).astype(np.float32)
    p_q = np.array([[120]])
    p_k = p_q - w
    q_abs = np.concatenate([q[..., :c], np.asarray(apply_rope(jnp.asarray(q[..., c:]), jnp.asarray(p_q), ROPE))], -1)
    k_roped = np.asarray(apply_rope(jnp.asarray(k[:, :, None, c:]), jnp.asarray(p_k), ROPE))[:, :, 0]
    keys = np.concatenate([k[..., :c], k_roped], -1)
    exact = np.einsum("bshd,btd->bsht", q_abs, keys)
    q_hat = a2ats.wrope_queries(jnp.asarray(q_abs), jnp.asarray(p_q), r, ROPE, w)
    k_hat = a2ats.prerope_keys(jnp.asarray(keys), jnp.asarray(p_k), r, ROPE)
    approx = jnp.einsum("bshd,btd->bsht", q_hat, k_hat)
    np.testing.assert_allclose(approx, exact, rtol=1e-4, atol=1e-4)
    # ...and differs at another distance (the approximation is position-free).
    k_hat_far = a2ats.prerope_keys(jnp.asarray(keys), jnp.asarray(p_k - 500), r, ROPE)
    assert not np.allclose(jnp.einsum("bshd,btd->bsht", q_hat, k_hat_far), exact, atol=1e-3)


def test_query_metric_is_cholesky_of_normalised_second_moment():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(200, 5)) * np.array([5.0, 1.0, 0.2, 1.0, 3.0])
    h = q.T @ q / len(q)
    h = h / np.sqrt(np.mean(h * h)) + 1e-6 * np.eye(5)
    lower = np.asarray(a2ats.query_metric(jnp.asarray(q, jnp.float32)))
    np.testing.assert_allclose(lower @ lower.T, h, rtol=1e-4, atol=1e-5)
    assert np.allclose(np.triu(lower, 1), 0)
    np.testing.assert_array_equal(a2ats.query_metric(jnp.asarray(q, jnp.float32), False), np.eye(5))


def test_kmeans_matches_numpy_lloyd_from_the_same_seeding():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=(40, 3)) * 0.1 + c for c in ([0, 0, 0], [4, 0, 0], [0, 4, 1])])
    x = x.astype(np.float32)
    key = jax.random.PRNGKey(0)
    init = np.asarray(a2ats.kmeans_pp_init(jnp.asarray(x), 3, key))
    # k-means++ on well separated clusters seeds one centroid in each.
    assert sorted(np.argmin(((init[:, None] - np.array([[0, 0, 0], [4, 0, 0], [0, 4, 1]])) ** 2).sum(-1), 1)) == [0, 1, 2]
    cents, inertia = a2ats.kmeans(jnp.asarray(x), 3, key, iters=20, tol=0.0)
    ref = init.astype(np.float64)
    for _ in range(20):
        codes = np.argmin(((x[:, None] - ref[None]) ** 2).sum(-1), 1)
        ref = np.stack([x[codes == j].mean(0) if np.any(codes == j) else ref[j] for j in range(3)])
    np.testing.assert_allclose(cents, ref, atol=1e-4)
    codes = np.argmin(((x[:, None] - ref[None]) ** 2).sum(-1), 1)
    np.testing.assert_allclose(inertia, ((x - ref[codes]) ** 2).sum(), rtol=1e-4)
    # Same seed, same centroids.
    np.testing.assert_array_equal(cents, a2ats.kmeans(jnp.asarray(x), 3, key, iters=20, tol=0.0)[0])


def _anisotropic(rng, n=600, d=6):
    keys = rng.normal(size=(n, d)).astype(np.float32)
    queries = (rng.normal(size=(n, d)) * np.array([8.0, 4.0, 0.1, 0.1, 0.1, 0.1])).astype(np.float32)
    return keys, queries


def test_codebook_codes_and_query_aware_error():
    rng = np.random.default_rng(4)
    keys, queries = _anisotropic(rng)
    cfg = A2ATSConfig(codebook_size=16, kmeans_iters=30)
    book = a2ats.build_codebook(jnp.asarray(keys), jnp.asarray(queries), cfg, jax.random.PRNGKey(0))
    lower = np.asarray(book.transform, np.float64)
    np.testing.assert_allclose(np.asarray(book.centroids, np.float64) @ lower, book.centroids_l,
                               rtol=1e-3, atol=1e-3)
    codes = np.asarray(a2ats.assign_codes(book, jnp.asarray(keys)))
    d = (((keys @ lower)[:, None] - np.asarray(book.centroids_l)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(codes, np.argmin(d, 1))

    def score_error(b):
        c = np.asarray(a2ats.assign_codes(b, jnp.asarray(keys)))
        return np.mean((queries @ (keys - np.asarray(b.centroids)[c]).T) ** 2)

    plain = a2ats.build_codebook(jnp.asarray(keys), jnp.asarray(queries),
                                 A2ATSConfig(codebook_size=16, kmeans_iters=30, query_aware=False),
                                 jax.random.PRNGKey(0))
    np.testing.assert_allclose(plain.transform, np.eye(6))
    assert score_error(book) < 0.5 * score_error(plain)


def test_approx_scores_gather_the_centroid_table():
    rng = np.random.default_rng(5)
    book = a2ats.Codebook(centroids=jnp.asarray(rng.normal(size=(7, 4)), jnp.float32),
                          centroids_l=None, transform=None)
    q = rng.normal(size=(2, 3, 2, 4)).astype(np.float32)
    codes = rng.integers(0, 7, (2, 9))
    ref = np.einsum("bshd,btd->bsht", q, np.asarray(book.centroids)[codes])
    np.testing.assert_allclose(a2ats.approx_scores(book, jnp.asarray(q), jnp.asarray(codes)), ref,
                               rtol=1e-5, atol=1e-5)


def np_selection(cfg, scores, q_pos, kv_pos):
    b, s, h, t = scores.shape
    out = np.zeros((b, s, t), bool)
    for i in range(b):
        for j in range(s):
            p = q_pos[i, j]
            seen = (kv_pos[i] >= 0) & (kv_pos[i] <= p)
            exact = seen & ((kv_pos[i] < cfg.sink_tokens) | (kv_pos[i] > p - cfg.local_window))
            out[i, j] = exact
            cand = np.flatnonzero(seen & ~exact)
            k = max(1, math.ceil(cfg.topk_fraction * (p + 1)))
            for hh in range(h):
                order = cand[np.argsort(-scores[i, j, hh, cand], kind="stable")]
                out[i, j, order[:k]] = True
    return out


@pytest.mark.parametrize("frac", [0.1, 0.3, 1.0])
def test_selection_mask_matches_numpy(frac):
    rng = np.random.default_rng(6)
    cfg = A2ATSConfig(topk_fraction=frac, sink_tokens=2, local_window=3)
    b, s, h, t = 2, 4, 3, 30
    scores = rng.normal(size=(b, s, h, t)).astype(np.float32)
    q_pos = np.array([[5, 12, 20, 29], [0, 3, 17, 25]])
    kv_pos = np.tile(np.arange(t), (b, 1))
    kv_pos[1, 27:] = -1  # empty slots
    got = np.asarray(a2ats.selection_mask(cfg, jnp.asarray(scores), jnp.asarray(q_pos),
                                          jnp.asarray(kv_pos)))
    np.testing.assert_array_equal(got, np_selection(cfg, scores, q_pos, kv_pos))
    if frac == 1.0:  # everything: the full causal mask
        causal = (kv_pos[:, None, :] >= 0) & (kv_pos[:, None, :] <= q_pos[:, :, None])
        np.testing.assert_array_equal(got, causal)


@pytest.mark.parametrize("frac,book,max_topk", [(0.1, 5, None), (0.3, 3, None), (0.25, 40, 4),
                                                  (1.0, 7, None)])
def test_code_selection_equals_topk_selection_with_ties(frac, book, max_topk):
    """Selecting through the per-code table (histogram + sort of K) gives exactly the top-k
    selection of the gathered scores, ties (many keys per code, equal values across codes)
    broken by position as top_k does."""
    rng = np.random.default_rng(8)
    cfg = A2ATSConfig(topk_fraction=frac, sink_tokens=2, local_window=3)
    b, s, h, t = 2, 4, 3, 40
    table = rng.integers(-3, 4, size=(b, s, h, book)).astype(np.float32)  # repeated values
    codes = rng.integers(0, book, size=(b, t))
    q_pos = np.array([[5, 12, 30, 39], [0, 3, 17, 35]])
    kv_pos = np.tile(np.arange(t), (b, 1))
    kv_pos[1, 36:] = -1  # empty slots
    scores = np.take_along_axis(table, np.broadcast_to(codes[:, None, None, :], (b, s, h, t)), -1)
    want = np.asarray(a2ats.selection_mask(cfg, jnp.asarray(scores), jnp.asarray(q_pos),
                                           jnp.asarray(kv_pos), max_topk))
    got = np.asarray(a2ats.code_selection_mask(cfg, jnp.asarray(table), jnp.asarray(codes),
                                               jnp.asarray(q_pos), jnp.asarray(kv_pos), max_topk))
    np.testing.assert_array_equal(got, want)
    if max_topk is None:
        np.testing.assert_array_equal(got, np_selection(cfg, scores, q_pos, kv_pos))


@pytest.mark.parametrize("n", [1, 7, 30, 45])
def test_top_n_mask_is_top_k_with_its_tie_order(n):
    rng = np.random.default_rng(10)
    prio = rng.integers(-4, 4, size=(3, 40)).astype(np.float32) * 0.5  # many ties
    prio[rng.random((3, 40)) < 0.3] = -np.inf
    got = np.asarray(a2ats.top_n_mask(jnp.asarray(prio), n))
    for row, p in zip(got, prio):
        order = np.argsort(-p, kind="stable")  # top_k: highest first, lowest index among ties
        want = np.zeros(40, bool)
        want[[i for i in order[:n] if p[i] > -np.inf]] = True
        np.testing.assert_array_equal(row, want)


def test_compact_positions_lists_the_mask_ascending():
    rng = np.random.default_rng(9)
    mask = rng.random((3, 50)) < 0.3
    mask[2] = False
    got = np.asarray(a2ats.compact_positions(jnp.asarray(mask), 20))
    for row, m in zip(got, mask):
        idx = np.flatnonzero(m)[:20]
        np.testing.assert_array_equal(row[:len(idx)], idx)
        assert (row[len(idx):] == -1).all()


def test_masked_attention_and_recall_match_numpy():
    rng = np.random.default_rng(7)
    q = rng.normal(size=(1, 2, 3, 6)).astype(np.float32)
    keys = rng.normal(size=(1, 10, 6)).astype(np.float32)
    mask = rng.random((1, 2, 10)) < 0.5
    mask[..., 0] = True
    out = np.asarray(a2ats.masked_attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(mask), 0.4, 4))
    s = np.einsum("bshd,btd->bsht", q, keys) * 0.4
    s = np.where(mask[:, :, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("bsht,btc->bshc", p, keys[..., :4]), rtol=1e-5, atol=1e-6)
    pos = np.arange(10)[None]
    qp = np.array([[9, 9]])
    rec = np.asarray(a2ats.attention_mass_recall(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(pos),
                                                 jnp.asarray(qp), jnp.asarray(mask), 0.4))
    full = np.exp(np.einsum("bshd,btd->bsht", q, keys) * 0.4)
    full /= full.sum(-1, keepdims=True)
    np.testing.assert_allclose(rec, (full * mask[:, :, None]).sum(-1), rtol=1e-5)


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="topk_fraction=0.0"):
        A2ATSConfig(topk_fraction=0.0)
    with pytest.raises(ValueError, match="offload='disk'"):
        A2ATSConfig(offload="disk")
    with pytest.raises(ValueError, match="max_gather_fraction=1.5"):
        A2ATSConfig(max_gather_fraction=1.5)
    with pytest.raises(ValueError, match="codebook_size=0"):
        A2ATSConfig(codebook_size=0)
