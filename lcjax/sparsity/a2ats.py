"""A²ATS for MLA: windowed-RoPE, query-aware vector quantization of the latent keys, top-k retrieval.

What is quantized, and why. Absorbed MLA decode is multi-query attention over one latent "key
head" per sublayer: the cached key of token t is [c_t, k_rope_t] (C + R dims) and the query of
head h is [q_lat_h, q_rope_h] with q_lat_h = q_nope_h · W_uk_h, so every score is
q_lat_h·c_t + q_rope_h·k_rope_t. We quantize that whole C+R key vector with one codebook per
sublayer, shared by all H query heads (the paper's GQA group is here all heads):
- the nope part c_t is what dominates the dot product (C = 512 of 576 dims in the 560B model) and
  is position-free already;
- the rope part is made position-free by WRoPE: the key is stored pre-RoPE (the cached roped
  k_rope rotated back by its own position) and the query's rope half is rotated to a fixed
  relative position W (default 2048): q̂ = [q_lat, rot(q_rope, W - p_q)], k̂ = [c, rot(k_rope, -p_k)],
  so q̂·k̂ equals the exact score of a key sitting exactly W tokens back. Quantizing the two
  halves jointly lets the query-aware metric trade error between them by their real weight
  (q_rope is small), instead of spending a separate codebook on 64 dims.
Query-aware VQ minimises E_q[(q̂·(k̂ - c))²] = (k̂ - c)ᵀ H (k̂ - c), H = E[q̂ q̂ᵀ] over calibration
queries of every head: with H = L Lᵀ (Cholesky) this is plain k-means on k̂ L; centroids map back
as C L⁻¹. Plain VQ is L = I.

Retrieval of one query at position p over keys 0..p: sink tokens (< `sink_tokens`) and the local
window (> p - `local_window`) are always attended exactly; every other key gets the approximate
score q̂·centroid[code] per head; each head keeps its top ceil(topk_fraction · (p + 1)); the union
over heads, sinks and window is then attended exactly. `topk_fraction = 1` keeps every key, which
is exact attention (the equality tests run that way).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from lcjax.config import RopeConfig
from lcjax.model.rope import inv_frequencies


@dataclasses.dataclass(frozen=True)
class A2ATSConfig:
    """Retrieval and codebook settings (the paper's defaults)."""

    topk_fraction: float = 0.03  # keys retrieved per head, as a fraction of the context
    codebook_size: int = 4096  # centroids per full-attention sublayer
    sink_tokens: int = 8  # first tokens, always exact
    local_window: int = 64  # last tokens (incl. the query's own), always exact
    wrope_position: int = 2048  # fixed relative position the query is rotated to
    query_aware: bool = True  # False: plain k-means on the keys (L = I)
    kmeans_iters: int = 50  # Lloyd iterations after k-means++ (the paper's code runs <= 300)
    kmeans_tol: float = 1e-4  # stop when the relative inertia change falls below this
    seed: int = 0
    offload: str = "none"  # "host": the latent pages live in host memory (see a2ats_cache)
    # Cap on the keys a query (serving: a step's rows) attends, as a fraction of the cache
    # capacity T (+ sinks + window). None: the whole union over heads (H * k keys at worst).
    # When the union is larger, the keys some head ranks highest are kept (`cap_selection`).
    max_gather_fraction: Optional[float] = None

    def __post_init__(self):
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ValueError(f"a2ats topk_fraction={self.topk_fraction} must be in (0, 1]")
        for name in ("codebook_size", "local_window", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"a2ats {name}={getattr(self, name)} must be >= 1")
        for name in ("sink_tokens", "wrope_position"):
            if getattr(self, name) < 0:
                raise ValueError(f"a2ats {name}={getattr(self, name)} must be >= 0")
        if self.max_gather_fraction is not None and not 0.0 < self.max_gather_fraction <= 1.0:
            raise ValueError(f"a2ats max_gather_fraction={self.max_gather_fraction} must be in (0, 1]")
        if self.offload not in ("none", "host"):
            raise ValueError(f"a2ats offload={self.offload!r} must be 'none' or 'host'")

    def topk_for(self, length: int) -> int:
        """Keys each head retrieves from a context of `length` tokens (at least 1)."""
        return max(1, math.ceil(self.topk_fraction * length))


@flax.struct.dataclass
class Codebook:
    """One sublayer's codebook: centroids in key space (scores) and in L space (assignment)."""

    centroids: Any  # [K, D] mapped back: C L^-1, scored against q̂
    centroids_l: Any  # [K, D] in k̂ L space, matched against new keys
    transform: Any  # [D, D] L (identity for plain VQ)

    @property
    def size(self) -> int:
        return self.centroids.shape[0]


# ----------------------------------------------------------------------------- WRoPE
def rotate(x: Float[Array, "... S H R"], delta: Int[Array, "... S"],
           rope: RopeConfig) -> Float[Array, "... S H R"]:
    """Rotate de-interleaved rope vectors ([evens | odds], the cached layout) by `delta` positions.

    A pure rotation (no YaRN magnitude factor), so rotate(rotate(x, a), b) = rotate(x, a + b) and
    rotating a cached k_rope by minus its position gives the pre-RoPE key (times the factor).
    """
    half = x.shape[-1] // 2
    inv_freq, _ = inv_frequencies(rope, x.shape[-1])
    angles = delta.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [.., S, R/2]
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def prerope_keys(keys: Float[Array, "B T D"], positions: Int[Array, "B T"], rope_dim: int,
                 rope: RopeConfig) -> Float[Array, "B T D"]:
    """k̂ = [c, rot(k_rope, -p)]: cached keys [latent | roped k_rope] with the rope undone."""
    c = keys.shape[-1] - rope_dim
    unroped = rotate(keys[..., None, c:], -positions, rope)[..., 0, :]
    return jnp.concatenate([keys[..., :c], unroped.astype(keys.dtype)], -1)


def wrope_queries(q_abs: Float[Array, "B S H D"], positions: Int[Array, "B S"], rope_dim: int,
                  rope: RopeConfig, wrope_position: int) -> Float[Array, "B S H D"]:
    """q̂ = [q_lat, rot(q_rope, W - p)]: the absorbed query as if every key sat W tokens back."""
    c = q_abs.shape[-1] - rope_dim
    rotated = rotate(q_abs[..., c:], wrope_position - positions, rope)
    return jnp.concatenate([q_abs[..., :c], rotated], -1)


# ------------------------------------------------------------------------- calibration
def query_metric(queries: Float[Array, "N D"], query_aware: bool = True) -> Float[Array, "D D"]:
    """Cholesky factor L of H = E[q̂ q̂ᵀ] (normalised by the RMS of its entries, + 1e-6 I).

    The normalisation only rescales the k-means objective (same minimisers) and keeps the
    regulariser's weight independent of the queries' magnitude. Plain VQ: the identity.
    """
    d = queries.shape[-1]
    if not query_aware:
        return jnp.eye(d, dtype=jnp.float32)
    q = queries.astype(jnp.float32)
    h = q.T @ q / q.shape[0]
    h = h / jnp.sqrt(jnp.mean(h * h)) + 1e-6 * jnp.eye(d, dtype=jnp.float32)
    return jnp.linalg.cholesky(h)


def _sq_dists(x: Float[Array, "N D"], c: Float[Array, "K D"]) -> Float[Array, "N K"]:
    return (jnp.sum(x * x, -1)[:, None] - 2.0 * x @ c.T + jnp.sum(c * c, -1)[None, :])


def kmeans_pp_init(x: Float[Array, "N D"], k: int, key: Array) -> Float[Array, "K D"]:
    """k-means++ seeding: each next centroid drawn with probability ∝ squared distance to the
    nearest chosen one (one O(N·D) update per centroid)."""
    n = x.shape[0]
    key, sub = jax.random.split(key)
    first = x[jax.random.randint(sub, (), 0, n)]
    cents = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
    d2 = jnp.sum((x - first) ** 2, -1)

    def body(i, carry):
        cents, d2, key = carry
        key, sub = jax.random.split(key)
        logits = jnp.where(d2 > 0, jnp.log(jnp.maximum(d2, 1e-30)), -jnp.inf)
        # All points already chosen (k > distinct points): any point will do.
        logits = jnp.where(jnp.any(d2 > 0), logits, 0.0)
        c = x[jax.random.categorical(sub, logits)]
        return cents.at[i].set(c), jnp.minimum(d2, jnp.sum((x - c) ** 2, -1)), key

    cents, _, _ = jax.lax.fori_loop(1, k, body, (cents, d2, key))
    return cents


def kmeans(x: Float[Array, "N D"], k: int, key: Array, iters: int, tol: float
           ) -> tuple[Float[Array, "K D"], Float[Array, ""]]:
    """k-means++ then Lloyd iterations until the relative inertia change < tol (or `iters`).
    Returns (centroids [K, D], final inertia). An emptied cluster keeps its centroid."""
    x = x.astype(jnp.float32)
    cents = kmeans_pp_init(x, k, key)

    def assign(c):
        d = _sq_dists(x, c)
        return jnp.argmin(d, -1), jnp.sum(jnp.min(d, -1))

    def step(carry):
        i, c, prev, _ = carry
        codes, inertia = assign(c)
        onehot = jax.nn.one_hot(codes, k, dtype=x.dtype)  # [N, K]
        counts = onehot.sum(0)
        new = jnp.where(counts[:, None] > 0, onehot.T @ x / jnp.maximum(counts, 1)[:, None], c)
        return i + 1, new, inertia, prev

    def cond(carry):  # inertia never increases under Lloyd steps
        i, _, inertia, prev = carry
        return (i < iters) & ((i < 2) | (prev - inertia > tol * inertia))

    init = (jnp.int32(0), cents, jnp.float32(jnp.inf), jnp.float32(jnp.inf))
    _, cents, _, _ = jax.lax.while_loop(cond, step, init)
    return cents, assign(cents)[1]


def build_codebook(keys: Float[Array, "N D"], queries: Float[Array, "M D"], cfg: A2ATSConfig,
                   key: Array) -> Codebook:
    """Codebook of one sublayer from calibration pre-RoPE keys k̂ and WRoPE queries q̂.

    The codebook never has more centroids than there are keys (then every key is its own).
    """
    if keys.ndim != 2 or queries.ndim != 2 or keys.shape[1] != queries.shape[1]:
        raise ValueError(f"keys {keys.shape} and queries {queries.shape} must be [N, D], [M, D]")
    lower = query_metric(queries, cfg.query_aware)
    k = min(cfg.codebook_size, keys.shape[0])
    cents_l, _ = jax.jit(kmeans, static_argnums=(1, 3, 4))(
        keys.astype(jnp.float32) @ lower, k, key, cfg.kmeans_iters, cfg.kmeans_tol)
    back = jax.scipy.linalg.solve_triangular(lower, cents_l.T, lower=True, trans=1).T  # C L^-1
    return Codebook(centroids=back, centroids_l=cents_l, transform=lower)


def assign_codes(book: Codebook, keys: Float[Array, "... D"]) -> Int[Array, "..."]:
    """Nearest centroid of k̂ L (the query-aware distance) for each pre-RoPE key."""
    x = keys.astype(jnp.float32) @ book.transform
    flat = x.reshape(-1, x.shape[-1])
    return jnp.argmin(_sq_dists(flat, book.centroids_l), -1).astype(jnp.int32).reshape(x.shape[:-1])


def code_dtype(codebook_size: int):
    """int16 codes when they fit (the paper's 12-bit code per token), else int32."""
    return jnp.int16 if codebook_size <= 2 ** 15 else jnp.int32


# --------------------------------------------------------------------------- retrieval
def code_tables(book: Codebook, q_hat: Float[Array, "B S H D"]) -> Float[Array, "B S H K"]:
    """q̂·centroid for every query head and centroid: the score of any key with that code."""
    return jnp.einsum("BSHD,KD->BSHK", q_hat.astype(jnp.float32), book.centroids)


def approx_scores(book: Codebook, q_hat: Float[Array, "B S H D"],
                  codes: Int[Array, "B T"]) -> Float[Array, "B S H T"]:
    """q̂·centroid[code] for every (query head, key): one [K] table per head, then a gather
    (O(K·D + T) per head instead of O(T·D))."""
    table = code_tables(book, q_hat)
    idx = jnp.broadcast_to(codes.astype(jnp.int32)[:, None, None, :],
                           table.shape[:3] + codes.shape[-1:])
    return jnp.take_along_axis(table, idx, axis=-1)


def always_exact(cfg: A2ATSConfig, q_positions: Int[Array, "B S"],
                 kv_positions: Int[Array, "B T"]) -> Bool[Array, "B S T"]:
    """Sinks and the local window of each query (keys at or before it)."""
    q, k = q_positions[:, :, None], kv_positions[:, None, :]
    seen = (k >= 0) & (k <= q)
    return seen & ((k < cfg.sink_tokens) | (k > q - cfg.local_window))


def selection_mask(cfg: A2ATSConfig, scores: Float[Array, "B S H T"], q_positions: Int[Array, "B S"],
                   kv_positions: Int[Array, "B T"], max_topk: Optional[int] = None
                   ) -> Bool[Array, "B S T"]:
    """Keys each query attends: sinks + window + the union over heads of each head's top-k.

    k = ceil(topk_fraction * (p + 1)) for a query at p; `max_topk` (static) bounds it, default
    that of the longest context the keys allow.
    """
    t = kv_positions.shape[-1]
    exact = always_exact(cfg, q_positions, kv_positions)
    seen = (kv_positions[:, None, :] >= 0) & (kv_positions[:, None, :] <= q_positions[:, :, None])
    candidate = seen & ~exact  # [B, S, T]
    masked = jnp.where(candidate[:, :, None, :], scores, -jnp.inf)
    kmax = min(t, max_topk or cfg.topk_for(t))
    top, idx = jax.lax.top_k(masked, kmax)  # [B, S, H, kmax]
    k_dyn = jnp.ceil(cfg.topk_fraction * (q_positions + 1).astype(jnp.float32)).astype(jnp.int32)
    keep = (jnp.arange(kmax) < jnp.maximum(k_dyn, 1)[:, :, None, None]) & (top > -jnp.inf)
    b, s, h, _ = idx.shape
    picked = jnp.zeros((b, s, t), bool).at[
        jnp.arange(b)[:, None, None, None], jnp.arange(s)[None, :, None, None], idx].max(keep)
    return exact | picked


def _ordered_keys(x: Float[Array, "..."]) -> Array:
    """uint32 keys with the order of the float32 values (negative floats flipped)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(1 << 31))


def _kth_key(count_at_least: Callable[[Array], Array], k: Array | int, shape: tuple) -> Array:
    """Per entry of `shape`, the largest uint32 key x with count_at_least(x) >= k (the key of
    the k-th best element), by a 32-step bisection: x is 0 when fewer than k exist."""

    def bisect(_, bounds):  # invariant: count(lo) >= k or lo = 0; count(hi + 1) < k
        lo, hi = bounds
        gap = hi - lo
        mid = lo + (gap >> 1) + (gap & 1)
        ok = count_at_least(mid) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    bounds = (jnp.zeros(shape, jnp.uint32), jnp.full(shape, 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, bisect, bounds)[0]


def _keep_best(live: Bool[Array, "... T"], keys: Array, thr: Array, need: Array,
               take_all: Array) -> Bool[Array, "... T"]:
    """live entries above the threshold key thr [...], plus the first `need` [...] of those tied
    at it in index order (top_k's tie order); every live entry where take_all."""
    tied = live & (keys == thr[..., None])
    first = jnp.cumsum(tied, axis=-1, dtype=jnp.int32) <= need[..., None]
    return live & (take_all | (keys > thr[..., None]) | (tied & first))


def code_selection_mask(cfg: A2ATSConfig, table: Float[Array, "B S H K"], codes: Int[Array, "B T"],
                        q_positions: Int[Array, "B S"], kv_positions: Int[Array, "B T"],
                        max_topk: Optional[int] = None) -> Bool[Array, "B S T"]:
    """selection_mask(cfg, table[..., codes], ...) without a top-k over the T keys.

    A key's approximate score is its code's entry of the head's [K] table, so each head's k-th
    best score is found among K values: per query, a histogram of the candidate keys' codes;
    per head, a 32-step bisection over the scores' order-preserving integer keys, counting
    through the histogram (O(K) a step), finds the threshold. Keys above it are kept; of the
    keys tied at it, the lowest positions fill the remaining places (top_k's tie order), so the
    result is identical to selection_mask. Work: O(T + 32 K) per head and no sort of T (a GPU
    runs a top-k of thousands out of tens of thousands as a sort)."""
    b, s, h, k_book = table.shape
    t = kv_positions.shape[-1]
    exact = always_exact(cfg, q_positions, kv_positions)
    seen = (kv_positions[:, None, :] >= 0) & (kv_positions[:, None, :] <= q_positions[:, :, None])
    candidate = seen & ~exact  # [B, S, T]
    codes = codes.astype(jnp.int32)
    counts = jnp.zeros((b, s, k_book), jnp.int32).at[
        jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None], codes[:, None, :]].add(
        candidate.astype(jnp.int32))[:, :, None, :]  # [B, S, 1, K] candidate keys per code
    kmax = min(t, max_topk or cfg.topk_for(t))
    k_dyn = jnp.ceil(cfg.topk_fraction * (q_positions + 1).astype(jnp.float32)).astype(jnp.int32)
    k_eff = jnp.minimum(jnp.maximum(k_dyn, 1), kmax)[:, :, None]  # [B, S, 1]
    keys = _ordered_keys(table)  # [B, S, H, K]
    thr = _kth_key(lambda x: jnp.sum(jnp.where(keys >= x[..., None], counts, 0), axis=-1),
                   k_eff, (b, s, h))  # [B, S, H]
    need = k_eff - jnp.sum(jnp.where(keys > thr[..., None], counts, 0), axis=-1)  # [B, S, H]
    take_all = (jnp.sum(counts, axis=-1) < k_eff)[..., None]  # [B, S, 1, 1]: fewer than k
    tok = jnp.take_along_axis(keys, jnp.broadcast_to(codes[:, None, None, :], (b, s, h, t)),
                              axis=-1)  # [B, S, H, T]
    picked = _keep_best(candidate[:, :, None, :], tok, thr, need, take_all)
    return exact | picked.any(axis=2)


def top_n_mask(prio: Float[Array, "B T"], n: int) -> Bool[Array, "B T"]:
    """The n entries of each row with the highest finite prio (all finite ones when fewer),
    ties to the lowest index: top_k's choice, found by a 32-step bisection over the values'
    order-preserving integer keys (O(32 T), no sort)."""
    keys = _ordered_keys(prio)
    live = prio > -jnp.inf
    thr = _kth_key(lambda x: jnp.sum(live & (keys >= x[:, None]), axis=1), n, prio.shape[:1])
    need = n - jnp.sum(live & (keys > thr[:, None]), axis=1)
    return _keep_best(live, keys, thr, need, (jnp.sum(live, axis=1) < n)[:, None])


def compact_positions(mask: Bool[Array, "B T"], n: int) -> Int[Array, "B N"]:
    """The indices t with mask[b, t], ascending, in a buffer of n (then -1s); at most n kept.
    A running count places each index: O(T), no sort."""
    b, t = mask.shape
    slot = jnp.where(mask, jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, n)
    return jnp.full((b, n), -1, jnp.int32).at[jnp.arange(b)[:, None], slot].set(
        jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t)), mode="drop")


def cap_selection(cfg: A2ATSConfig, scores: Float[Array, "B S H T"], mask: Bool[Array, "B S T"],
                  q_positions: Int[Array, "B S"], kv_positions: Int[Array, "B T"]) -> Bool[Array, "B S T"]:
    """`mask` limited to ceil(max_gather_fraction * T) + sinks + window keys per query: sinks
    and window first, then keys by their best head's score relative to that head's top score."""
    t = kv_positions.shape[-1]
    if cfg.max_gather_fraction is None:
        return mask
    n = min(t, math.ceil(cfg.max_gather_fraction * t) + cfg.sink_tokens + cfg.local_window)
    s_bsht = jnp.where(kv_positions[:, None, None, :] >= 0, scores, -jnp.inf)
    best = jnp.max(s_bsht - jnp.max(s_bsht, axis=-1, keepdims=True), axis=2)  # [B, S, T]
    exact = always_exact(cfg, q_positions, kv_positions)
    prio = jnp.where(exact, 1.0, jnp.where(mask, best, -jnp.inf))
    top, idx = jax.lax.top_k(prio, n)
    b, s = idx.shape[:2]
    return jnp.zeros_like(mask).at[jnp.arange(b)[:, None, None], jnp.arange(s)[None, :, None],
                                   idx].max(top > -jnp.inf)


def masked_attention(q_abs: Float[Array, "B S H D"], keys: Float[Array, "B T D"],
                     mask: Bool[Array, "B S T"], scale: float, value_dim: int
                     ) -> Float[Array, "B S H C"]:
    """Reference: absorbed attention of each query over its selected keys (values = keys[:C]).
    float32 softmax; a query with no key gives 0."""
    s_bsht = jnp.einsum("BSHD,BTD->BSHT", q_abs.astype(jnp.float32), keys.astype(jnp.float32)) * scale
    s_bsht = jnp.where(mask[:, :, None, :], s_bsht, -jnp.inf)
    m = jnp.max(s_bsht, -1, keepdims=True)
    p = jnp.where(mask[:, :, None, :], jnp.exp(s_bsht - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    out = jnp.einsum("BSHT,BTC->BSHC", p, keys[..., :value_dim].astype(jnp.float32))
    return out.astype(q_abs.dtype)


def attention_mass_recall(q_abs: Float[Array, "B S H D"], keys: Float[Array, "B T D"],
                          kv_positions: Int[Array, "B T"], q_positions: Int[Array, "B S"],
                          mask: Bool[Array, "B S T"], scale: float) -> Float[Array, "B S H"]:
    """Share of each head's exact causal attention probability that falls on the selected keys."""
    s_bsht = jnp.einsum("BSHD,BTD->BSHT", q_abs.astype(jnp.float32), keys.astype(jnp.float32)) * scale
    seen = (kv_positions[:, None, :] >= 0) & (kv_positions[:, None, :] <= q_positions[:, :, None])
    p = jax.nn.softmax(jnp.where(seen[:, :, None, :], s_bsht, -jnp.inf), axis=-1)
    return jnp.sum(jnp.where(mask[:, :, None, :], p, 0.0), -1)
