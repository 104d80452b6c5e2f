"""Paged MLA latent cache for serving: a page pool per full-attention sublayer, a block allocator.

Each full-attention sublayer (and the MTP draft layer) owns a pool `[P, L, C+R]` of pages holding
the normed latent and the roped shared key of each token, concatenated, so absorbed decode reads
one array (keys = all C+R dims, values = the first C). A sequence's pages are listed in its row
of the block table; token p sits at page `block_tables[b, p // L]`, offset `p % L`. All pools
share one block table: page i of every sublayer belongs to the same sequence.

LoZA sparse sublayers see only sink + local blocks, so they keep a constant-size ring per engine
slot (`LayerCache`, see lcjax/model/cache.py) instead of pages: paging would only add tables.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from lcjax.config import LozaConfig, ModelConfig
from lcjax.model.cache import LayerCache, init_layer_cache
from lcjax.model.layers import dtype_of
from lcjax.ops import attention as attention_op
from lcjax.sparsity import sparse_verify
from lcjax.sparsity.host_offload import to_host


@flax.struct.dataclass
class PagedLayerCache:
    """One sublayer's page pool, viewed through the block tables of the rows of one step."""

    pages: Any  # [P, L, C+R]
    block_tables: Any  # [B, N] int32: physical page of each logical page of each row
    kv_lora_rank: int = flax.struct.field(pytree_node=False)
    # True when every query row is fully valid (decode, verify): the paged decode kernel may run.
    all_valid: bool = flax.struct.field(pytree_node=False, default=False)
    implementation: Optional[str] = flax.struct.field(pytree_node=False, default=None)
    # Sparse verification (lcjax/sparsity/sparse_verify.py): per-page key bounds kept up to date
    # by `write`, and the selector that picks the pages an all-valid step attends to.
    bounds: Any = None  # [P, 2, C+R] per-page [min, max] of each key dim, or None (not kept)
    select: Optional[Callable] = flax.struct.field(pytree_node=False, default=None)

    @property
    def page_size(self) -> int:
        return self.pages.shape[1]

    def write(self, latent: Float[Array, "B S C"], k_rope: Float[Array, "B S R"],
              positions: Int[Array, "B S"], valid: Bool[Array, "B S"]) -> "PagedLayerCache":
        """File valid tokens into their pages; padding is dropped by an out-of-range index."""
        num_pages, page, width = self.pages.shape
        logical = jnp.clip(positions // page, 0, self.block_tables.shape[1] - 1)
        phys = jnp.take_along_axis(self.block_tables, logical, axis=1)
        flat = jnp.where(valid, phys * page + positions % page, num_pages * page)
        rows = jnp.concatenate([latent, k_rope], axis=-1).astype(self.pages.dtype)
        pool = self.pages.reshape(num_pages * page, width)
        pool = pool.at[flat.reshape(-1)].set(rows.reshape(-1, width), mode="drop")
        pages = pool.reshape(num_pages, page, width)
        bounds = self.bounds if self.bounds is None else sparse_verify.update_bounds(
            self.bounds, pages, self.block_tables, positions, valid)
        return self.replace(pages=pages, bounds=bounds)

    def update_and_attend(self, q_abs: Float[Array, "B S H D"], latent: Float[Array, "B S C"],
                          k_rope: Float[Array, "B S R"], positions: Int[Array, "B S"],
                          valid: Bool[Array, "B S"], *, sparse: bool, loza: LozaConfig,
                          attend: Callable, scale: float) -> tuple[Float[Array, "B S H C"], "PagedLayerCache"]:
        """Write the new tokens, then attend over every page of the row (absorbed MLA)."""
        cache = self.write(latent, k_rope, positions, valid)
        c = self.kv_lora_rank
        lengths = jnp.max(jnp.where(valid, positions + 1, 0), axis=1).astype(jnp.int32)  # [B]
        if self.all_valid:
            layout = attention_op.layout_for(sparse, loza)
            tables = self.block_tables
            if self.select is not None:
                tables, lengths = self.select(q_abs, cache.bounds, tables, lengths, self.page_size)
            out = attention_op.paged_decode_attention(
                q_abs, cache.pages[:, :, None, :].astype(q_abs.dtype), None, tables,
                jnp.maximum(lengths, q_abs.shape[1]), layout=layout,
                scale=scale, v_head_dim=c, implementation=self.implementation)
            return out, cache
        batch, num_logical = self.block_tables.shape
        keys = cache.pages[self.block_tables].reshape(batch, num_logical * self.page_size, -1)
        slots = jnp.arange(keys.shape[1], dtype=jnp.int32)[None, :]
        kv_positions = jnp.where(slots < lengths[:, None], slots, -1)
        keys = keys[:, :, None, :].astype(q_abs.dtype)  # [B, T, 1, C+R]
        out = attend(q_abs, keys, keys[..., :c], q_positions=positions, kv_positions=kv_positions)
        return out, cache


@flax.struct.dataclass
class ServeCache:
    """Device state of the engine's cache: pools for full sublayers, rings for sparse ones."""

    layers: tuple  # per attention sublayer: pages [P, L, C+R] (full) or LayerCache [slots, W, .] (sparse)
    mtp: Any  # [P, L, C+R] pages of the MTP draft layer, or None
    ngram_history: Any  # [slots, N-1] int32 last tokens per slot ([slots, 0] without n-gram)
    # per attention sublayer: [P, 2, C+R] page key bounds (full sublayers, when sparse
    # verification is on), else None
    bounds: tuple = ()
    # A²ATS retrieval state (codes, codebooks: lcjax/sparsity/a2ats_cache.py), or None
    retrieval: Any = None

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


def init_serve_cache(cfg: ModelConfig, num_slots: int, num_pages: int, page_size: int,
                     bounds: bool = False, host_pools: bool = False) -> ServeCache:
    """Zeroed pools and empty rings (every ring slot -1); with `bounds`, per-page key bounds of
    every full sublayer (sparse verification). With `host_pools` the full sublayers' pools are
    born in pinned host memory (A²ATS `offload="host"`), so the device never holds them, not
    even at start; rings, the MTP pool and bounds stay on the device."""
    dtype = dtype_of(cfg.dtype)
    width = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
    shape = (num_pages, page_size, width)

    def pool(host: bool = False):
        # From numpy: jax 0.10 rejects jnp.zeros placed in pinned_host ("Memory kind mismatch").
        return to_host(np.zeros(shape, dtype)) if host else jnp.zeros(shape, dtype)

    layers = tuple(
        init_layer_cache(num_slots, cfg.loza.cache_tokens, cfg.mla.kv_lora_rank,
                         cfg.mla.qk_rope_head_dim, dtype) if sparse else pool(host_pools)
        for sparse in cfg.sparse_layers)
    hist = cfg.ngram.neighbor_num - 1 if cfg.ngram.enabled else 0
    held = tuple(None if sparse or not bounds else jnp.zeros((num_pages, 2, width), dtype)
                 for sparse in cfg.sparse_layers)
    return ServeCache(layers=layers, mtp=pool() if cfg.mtp_layers else None,
                      ngram_history=jnp.zeros((num_slots, hist), jnp.int32),
                      bounds=held if bounds else ())


def gather_rings(ring: LayerCache, slots: Int[Array, "B"], reset: Bool[Array, "B"]) -> LayerCache:
    """The rows of the given engine slots; rows starting a new request come back empty."""
    idx = jnp.clip(slots, 0, ring.slot_pos.shape[0] - 1)
    rows = jax.tree.map(lambda a: a[idx], ring)
    return rows.replace(slot_pos=jnp.where(reset[:, None], -1, rows.slot_pos))


def scatter_rings(ring: LayerCache, rows: LayerCache, slots: Int[Array, "B"]) -> LayerCache:
    """Put rows back at their slots; padding rows (slot = -1) are dropped."""
    idx = jnp.where(slots < 0, ring.slot_pos.shape[0], slots)
    return jax.tree.map(lambda a, r: a.at[idx].set(r, mode="drop"), ring, rows)


class PageAllocator:
    """Host-side free list of physical pages. Page 0 is never handed out: padding rows of a
    step point their block tables at it, so their (dropped or ignored) reads stay in bounds."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages} must be >= 2 (page 0 is reserved)")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    def allocate(self, count: int) -> list[int]:
        """`count` pages, or ValueError if fewer are free (callers check `num_free` first)."""
        if count > len(self._free):
            raise ValueError(f"asked for {count} pages, only {len(self._free)} free")
        out = [self._free.pop() for _ in range(count)]
        return out

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
