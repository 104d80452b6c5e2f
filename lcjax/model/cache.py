"""Per-sublayer MLA latent KV cache: the normed latent + roped k_rope per token, never heads.

Full-attention sublayers keep one slot per position (capacity = longest sequence). LoZA sparse
sublayers keep only sink + local blocks (+ one spare block): positions < sink_len sit in fixed
slots, later positions share a ring of (local_blocks + 1) * block_size slots, so their memory is constant in the context length. Each slot
records the absolute position it holds (-1 = empty); attention masks by those positions, so one
masking rule serves both kinds.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from lcjax.config import LozaConfig


@flax.struct.dataclass
class LayerCache:
    """Latent cache of one attention sublayer (fields `Any`, shapes in comments: see RoutingStats)."""

    latent: Any  # [B, T, C]: RMSNorm(c) * sqrt(M / C), the value HF/vLLM cache
    k_rope: Any  # [B, T, R]: shared rope key, already rotated
    slot_pos: Any  # [B, T] int32: absolute position in each slot; -1 = empty

    @property
    def capacity(self) -> int:
        return self.slot_pos.shape[1]

    def update_and_attend(self, q_abs: Float[Array, "B S H D"], latent: Float[Array, "B S C"],
                          k_rope: Float[Array, "B S R"], positions: Int[Array, "B S"],
                          valid: Bool[Array, "B S"], *, sparse: bool, loza: LozaConfig,
                          attend: Callable, scale: float) -> tuple[Float[Array, "B S H C"], "LayerCache"]:
        """Absorbed attention of S new tokens over [cached slots, the new tokens], then file them.

        Attending before writing lets a chunk be longer than a sparse ring (chunked prefill):
        every key a query may see is either still cached or among the new tokens. Cached slots
        at or after a row's first new position are stale (rejected speculative tokens) and
        masked, so a position is never seen twice. `attend` runs the attention (scale bound in).
        """
        del scale
        dtype = q_abs.dtype
        first = jnp.min(jnp.where(valid, positions, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
        old_pos = jnp.where(self.slot_pos < first, self.slot_pos, -1)
        new_pos = jnp.where(valid, positions, -1).astype(jnp.int32)
        keys = jnp.concatenate([
            jnp.concatenate([self.latent, self.k_rope], -1).astype(dtype),
            jnp.concatenate([latent, k_rope], -1).astype(dtype)], axis=1)[:, :, None, :]  # [B,T+S,1,C+R]
        values = keys[..., : latent.shape[-1]]
        out = attend(q_abs, keys, values, q_positions=positions,
                     kv_positions=jnp.concatenate([old_pos, new_pos], axis=1))
        return out, write_layer_cache(self, latent, k_rope, positions, valid, sparse, loza)


def cache_capacity(sparse: bool, max_len: int, loza: LozaConfig) -> int:
    """Slots for one sublayer: the whole sequence, or sink + local (+ spare) blocks if sparse."""
    return min(max_len, loza.cache_tokens) if sparse else max_len


def init_layer_cache(batch: int, capacity: int, kv_lora_rank: int, rope_dim: int,
                     dtype: jnp.dtype) -> LayerCache:
    """An empty cache (every slot -1)."""
    return LayerCache(
        latent=jnp.zeros((batch, capacity, kv_lora_rank), dtype),
        k_rope=jnp.zeros((batch, capacity, rope_dim), dtype),
        slot_pos=jnp.full((batch, capacity), -1, jnp.int32),
    )


def _slots(positions: Int[Array, "B S"], keep: Bool[Array, "B S"], capacity: int, sparse: bool,
           loza: LozaConfig, max_len_cache: bool) -> Int[Array, "B S"]:
    """Slot index per new position; `capacity` (out of range, dropped by the scatter) if not kept."""
    if sparse and not max_len_cache:
        sink_len = loza.sink_blocks * loza.block_size
        ring = capacity - sink_len
        slot = jnp.where(positions < sink_len, positions, sink_len + (positions - sink_len) % ring)
    else:
        slot = positions
    return jnp.where(keep & (slot < capacity), slot, capacity)


def write_layer_cache(cache: LayerCache, latent: Float[Array, "B S C"], k_rope: Float[Array, "B S R"],
                      positions: Int[Array, "B S"], valid: Bool[Array, "B S"], sparse: bool,
                      loza: LozaConfig) -> LayerCache:
    """Store new tokens at their slots; a sparse ring keeps only each row's newest ring-size tokens.

    Several new positions can map to one ring slot (a long prompt); only the newest is written, so
    the scatter never has duplicate indices.
    """
    capacity = cache.capacity
    sink_len = loza.sink_blocks * loza.block_size
    # A sparse layer whose capacity covers the whole sequence needs no ring (short max_len).
    whole = capacity < loza.cache_tokens
    keep = valid
    if sparse and not whole:
        newest = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)  # [B, 1]
        keep = valid & ((positions < sink_len) | (positions > newest - (capacity - sink_len)))
    slot = _slots(positions, keep, capacity, sparse, loza, whole)
    rows = jnp.arange(positions.shape[0])[:, None]

    def put(buf, new):
        return buf.at[rows, slot].set(new.astype(buf.dtype), mode="drop")

    return LayerCache(latent=put(cache.latent, latent), k_rope=put(cache.k_rope, k_rope),
                      slot_pos=put(cache.slot_pos, positions.astype(jnp.int32)))


@flax.struct.dataclass
class ModelCache:
    """Decode state of the whole model: one LayerCache per attention sublayer, lengths, n-gram history."""

    layers: tuple  # tuple[LayerCache, ...], one per attention sublayer (2 per logical layer)
    lengths: Any  # [B] int32: tokens consumed per row = next position
    ngram_history: Any  # [B, N-1] int32: last tokens of the current segment ([B, 0] if no n-gram)

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))
