"""A²ATS latent caches: the serve engine's paged view with codes (+ host offload), and the
contiguous views used for calibration and teacher-forced evaluation.

Each is a cache with `update_and_attend` (the interface MLA.decode calls), so the model runs
unchanged: the technique plugs in through the cache objects it is handed.

Serving (`RetrievalPagedCache`): beside each full-attention sublayer's page pool [P, L, C+R] sits
a code pool [P, L] (int16: one centroid index per token). Writing a token files its latent row
and its code (nearest centroid of its pre-RoPE key). Prefill chunks attend exactly; decode and
verify steps score every cached key from codes, select sinks + window + per-head top-k, gather
only those rows (a fixed-size buffer) and attend over them.

Host offload (`offload="host"`): the page pools live in host memory (`pinned_host`); only the
codes, the codebook and each step's gathered rows are on the device. Gathers and writes of host
rows run on the host inside the jitted step (lcjax/ops/host_rows.py), and only the selected rows
cross to the device.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from lcjax.config import LozaConfig, ModelConfig, RopeConfig
from lcjax.model.cache import LayerCache, write_layer_cache
from lcjax.ops.host_rows import set_rows, take_rows
from lcjax.sparsity.host_offload import to_host
from lcjax.sparsity.a2ats import (A2ATSConfig, Codebook, always_exact, approx_scores,
                                  assign_codes, cap_selection, code_dtype, code_selection_mask,
                                  code_tables, compact_positions, masked_attention,
                                  prerope_keys, selection_mask, top_n_mask, wrope_queries)


def gather_rows(pool: Float[Array, "P L D"], flat: Int[Array, "B N"]) -> Float[Array, "B N D"]:
    """pool rows at flat slot indices (page * L + offset), gathered where the pool lives."""
    return take_rows(pool.reshape(-1, pool.shape[-1]), flat)


def scatter_rows(pool: Float[Array, "P L D"], flat: Int[Array, "N"],
                 rows: Float[Array, "N D"]) -> Float[Array, "P L D"]:
    """pool with rows written at flat slot indices (out of range: dropped), where it lives."""
    p, page, width = pool.shape
    return set_rows(pool.reshape(p * page, width), flat, rows).reshape(p, page, width)


@flax.struct.dataclass
class RetrievalPagedCache:
    """One full sublayer's pages + codes, viewed through the block tables of one step's rows."""

    pages: Any  # [P, L, C+R] latent rows (device or pinned host)
    codes: Any  # [P, L] int16 centroid index of each slot
    block_tables: Any  # [B, N] int32
    book: Codebook
    kv_lora_rank: int = flax.struct.field(pytree_node=False)
    rope: RopeConfig = flax.struct.field(pytree_node=False)
    config: A2ATSConfig = flax.struct.field(pytree_node=False)
    all_valid: bool = flax.struct.field(pytree_node=False, default=False)
    # Sparse verification: picks the positions a verify step attends, shared by its tokens and
    # by consecutive sublayers (lcjax/sparsity/sparse_verify_retrieval.py); None: per step.
    share: Optional[Callable] = flax.struct.field(pytree_node=False, default=None)

    @property
    def page_size(self) -> int:
        return self.pages.shape[1]

    def _flat(self, positions: Int[Array, "B S"]) -> Int[Array, "B S"]:
        page = self.page_size
        logical = jnp.clip(positions // page, 0, self.block_tables.shape[1] - 1)
        phys = jnp.take_along_axis(self.block_tables, logical, axis=1)
        return phys * page + jnp.maximum(positions, 0) % page

    def write(self, latent: Float[Array, "B S C"], k_rope: Float[Array, "B S R"],
              positions: Int[Array, "B S"], valid: Bool[Array, "B S"]) -> "RetrievalPagedCache":
        """File valid tokens' rows and codes; padding goes to an out-of-range slot (dropped)."""
        num_pages, page, width = self.pages.shape
        flat = jnp.where(valid, self._flat(positions), num_pages * page).reshape(-1)
        rows = jnp.concatenate([latent, k_rope], -1)
        hat = prerope_keys(rows.astype(jnp.float32), positions, k_rope.shape[-1], self.rope)
        codes = assign_codes(self.book, hat).astype(self.codes.dtype)
        pages = scatter_rows(self.pages, flat, rows.reshape(-1, width))
        code_pool = self.codes.reshape(-1).at[flat].set(codes.reshape(-1), mode="drop")
        return self.replace(pages=pages, codes=code_pool.reshape(num_pages, page))

    def update_and_attend(self, q_abs: Float[Array, "B S H D"], latent: Float[Array, "B S C"],
                          k_rope: Float[Array, "B S R"], positions: Int[Array, "B S"],
                          valid: Bool[Array, "B S"], *, sparse: bool, loza: LozaConfig,
                          attend: Callable, scale: float) -> tuple[Float[Array, "B S H C"], "RetrievalPagedCache"]:
        """Write the new tokens, then attend: exactly for prefill chunks, over the retrieved
        rows for decode / verify steps (`all_valid`)."""
        del sparse, loza, scale
        cache = self.write(latent, k_rope, positions, valid)
        c = self.kv_lora_rank
        batch, num_logical = self.block_tables.shape
        t_cap = num_logical * self.page_size
        lengths = jnp.max(jnp.where(valid, positions + 1, 0), axis=1).astype(jnp.int32)  # [B]
        slots = jnp.broadcast_to(jnp.arange(t_cap, dtype=jnp.int32)[None, :], (batch, t_cap))
        kv_positions = jnp.where(slots < lengths[:, None], slots, -1)
        if not self.all_valid:
            rows = gather_rows(cache.pages, self._flat(slots))  # [B, T, C+R]
            keys = rows[:, :, None, :].astype(q_abs.dtype)
            return attend(q_abs, keys, keys[..., :c], q_positions=positions,
                          kv_positions=kv_positions), cache
        if self.share is not None:
            selected = self.share(cache, q_abs, positions, kv_positions)  # [B, n]
        else:
            selected = cache.select(q_abs, positions, kv_positions)  # [B, n]
        rows = gather_rows(cache.pages, self._flat(selected))  # [B, n, C+R]
        keys = rows[:, :, None, :].astype(q_abs.dtype)
        return attend(q_abs, keys, keys[..., :c], q_positions=positions,
                      kv_positions=selected), cache

    def select(self, q_abs: Float[Array, "B S H D"], positions: Int[Array, "B S"],
               kv_positions: Int[Array, "B T"], extra: Optional[Bool[Array, "B T"]] = None,
               num_extra: int = 0) -> Int[Array, "B N"]:
        """Positions the step's queries attend (ascending; -1 = unused entry of the buffer).

        The union over the step's S queries of sinks + window + per-head top-k, compacted into a
        static buffer of min(T, S * (H * kmax + sinks + window)) entries; `extra` (at most
        `num_extra` per row, e.g. the verify tokens' own positions) joins the union beyond
        that budget and any max_gather_fraction cap.
        """
        cfg, t = self.config, kv_positions.shape[1]
        codes = self.codes[self.block_tables].reshape(kv_positions.shape)  # [B, T]
        q_hat = wrope_queries(q_abs, positions, q_abs.shape[-1] - self.kv_lora_rank, self.rope,
                              cfg.wrope_position)
        table = code_tables(self.book, q_hat)  # [B, S, H, K]
        kmax = min(t, cfg.topk_for(t))
        mask = code_selection_mask(cfg, table, codes, positions, kv_positions,
                                   kmax).any(axis=1)  # [B, T]
        s, h = q_abs.shape[1], q_abs.shape[2]
        n = min(t, s * (h * kmax + cfg.sink_tokens + cfg.local_window))
        if cfg.max_gather_fraction is not None:
            cap = math.ceil(cfg.max_gather_fraction * t) + cfg.sink_tokens + cfg.local_window
            n = min(n, s * cap)
        n = min(t, n + num_extra) if extra is not None else n
        if n < t and cfg.max_gather_fraction is not None:
            # Over budget: sinks, windows and extras first, then keys by their best head's
            # score relative to that head's top score.
            exact = always_exact(cfg, positions, kv_positions).any(axis=1)
            exact = exact if extra is None else exact | extra
            scores = approx_scores(self.book, q_hat, codes)
            scores = jnp.where(kv_positions[:, None, None, :] >= 0, scores, -jnp.inf)
            rel = scores - jnp.max(scores, axis=-1, keepdims=True)
            best = jnp.max(rel, axis=(1, 2))  # [B, T], <= 0
            prio = jnp.where(exact, 1.0, jnp.where(mask, best, -jnp.inf))
            return compact_positions(top_n_mask(prio, n), n)  # ascending, then -1s
        mask = mask if extra is None else mask | extra
        return compact_positions(mask, n)  # ascending positions first, then -1s


@flax.struct.dataclass
class ServeRetrieval:
    """The engine cache's A²ATS state: codes pools and codebooks per attention sublayer (None for
    LoZA sparse sublayers, which keep their exact rings). `views` / `absorb` wrap and unwrap the
    engine's paged views around each step's forward."""

    codes: tuple  # per sublayer: [P, L] int16, or None
    books: tuple  # per sublayer: Codebook, or None
    rope: RopeConfig = flax.struct.field(pytree_node=False)
    config: A2ATSConfig = flax.struct.field(pytree_node=False)

    def views(self, views: tuple, share: Optional[Callable] = None) -> tuple:
        """Replace each paged view of a retrieval sublayer by a RetrievalPagedCache (`share`:
        the sparse-verify selection its all-valid steps use, see RetrievalPagedCache.share)."""
        out = []
        for view, codes, book in zip(views, self.codes, self.books):
            if book is None:
                out.append(view)
                continue
            out.append(RetrievalPagedCache(
                pages=view.pages, codes=codes, block_tables=view.block_tables, book=book,
                kv_lora_rank=view.kv_lora_rank, rope=self.rope, config=self.config,
                all_valid=view.all_valid, share=share if view.all_valid else None))
        return tuple(out)

    def absorb(self, views: tuple) -> "ServeRetrieval":
        """The codes written by a step's views."""
        return self.replace(codes=tuple(v.codes if b is not None else None
                                        for v, b in zip(views, self.books)))


def attach(index: "Any", cache: Any, num_pages: int, page_size: int) -> Any:
    """A ServeCache with `retrieval` state for `index` (codes zeroed), pages moved to pinned
    host memory when index.config.offload == 'host' (pools that init_serve_cache(host_pools=True)
    built there already are kept, not copied)."""
    cfg = index.config
    dtype = code_dtype(cfg.codebook_size)
    codes = tuple(None if b is None else jnp.zeros((num_pages, page_size), dtype)
                  for b in index.books)
    state = ServeRetrieval(codes=codes, books=index.books, rope=index.rope, config=cfg)
    layers = cache.layers
    if cfg.offload == "host":
        layers = tuple(to_host(l) if b is not None else l for l, b in zip(layers, index.books))
    return cache.replace(layers=layers, retrieval=state)


# ------------------------------------------------------------- contiguous (eval, calibration)
@flax.struct.dataclass
class RecordingCache:
    """A LayerCache that also keeps the absorbed queries and keys of its last call (calibration)."""

    inner: LayerCache
    q_abs: Any = None  # [B, S, H, C+R]
    keys: Any = None  # [B, S, C+R] roped, as cached
    positions: Any = None  # [B, S]

    def update_and_attend(self, q_abs, latent, k_rope, positions, valid, **kwargs):
        out, inner = self.inner.update_and_attend(q_abs, latent, k_rope, positions, valid, **kwargs)
        keys = jnp.concatenate([latent, k_rope], -1)
        return out, RecordingCache(inner=inner, q_abs=q_abs, keys=keys, positions=positions)


@flax.struct.dataclass
class RetrievalDenseCache:
    """Contiguous cache whose every query attends only its A²ATS selection (teacher-forced
    evaluation: one forward of a whole sequence equals decoding it token by token with
    retrieval). Keeps the selection mask and exact queries/keys of its last call for recall."""

    inner: LayerCache
    book: Codebook
    rope: RopeConfig = flax.struct.field(pytree_node=False)
    config: A2ATSConfig = flax.struct.field(pytree_node=False)
    # True: rank keys by their exact scores (the best any top-k retrieval can do; evaluation)
    oracle: bool = flax.struct.field(pytree_node=False, default=False)
    mask: Any = None  # [B, S, T]
    q_abs: Any = None
    keys: Any = None
    kv_positions: Any = None

    def update_and_attend(self, q_abs, latent, k_rope, positions, valid, *, sparse, loza, attend,
                          scale):
        del attend
        c, r = latent.shape[-1], k_rope.shape[-1]
        inner = self.inner
        first = jnp.min(jnp.where(valid, positions, jnp.iinfo(jnp.int32).max), 1, keepdims=True)
        old_pos = jnp.where(inner.slot_pos < first, inner.slot_pos, -1)
        keys = jnp.concatenate([jnp.concatenate([inner.latent, inner.k_rope], -1),
                                jnp.concatenate([latent, k_rope], -1).astype(inner.latent.dtype)], 1)
        kv_positions = jnp.concatenate([old_pos, jnp.where(valid, positions, -1)], 1)
        hat = prerope_keys(keys.astype(jnp.float32), jnp.maximum(kv_positions, 0), r, self.rope)
        codes = assign_codes(self.book, hat)
        q_hat = wrope_queries(q_abs, positions, r, self.rope, self.config.wrope_position)
        scores = approx_scores(self.book, q_hat, codes)
        if self.oracle:
            scores = jnp.einsum("BSHD,BTD->BSHT", q_abs.astype(jnp.float32), keys.astype(jnp.float32))
        mask = selection_mask(self.config, scores, positions, kv_positions)
        mask = cap_selection(self.config, scores, mask, positions, kv_positions)
        out = masked_attention(q_abs, keys, mask, scale, c)
        new = write_layer_cache(inner, latent, k_rope, positions, valid, sparse, loza)
        return out, self.replace(inner=new, mask=mask, q_abs=q_abs, keys=keys,
                                 kv_positions=kv_positions)
