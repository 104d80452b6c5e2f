"""Paged decode attention: a few new query tokens per sequence against a paged KV cache.

Sequence b holds `lengths[b]` tokens at logical positions 0..lengths[b]-1 (the S new tokens
already written last); token p lives in page `block_tables[b, p // L]`, slot p % L. Query i sits
at position lengths[b] - S + i. The layout is evaluated on these positions, so LoZA decode sees
its sink block and local window only: kernels visit just those pages.

Absorbed MLA decode is multi-query attention over the latent cache: one kv head (G = 1) with keys
[c | k_rope] (Dk = 576) whose first 512 dims are also the values. Pass `v_pages=None` and
`v_head_dim=512`: values are read from the key pages, so the cache is stored and read once.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Callable

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.reference import attention_reference
from pallas_kernels.registry import Registry

# Every backend: "xla" is the reference; the others are modules of this package (named in
# _BACKEND_MODULES where the file is not <name>.py) with `paged_decode_attention(...)` (taking
# `interpret=` when in INTERPRET_BACKENDS). "tpu_paged" wraps jax's TPU paged-attention kernel
# (one token, no layout): on TPU it comes first, since our only TPU path is the reference;
# `scripts/device_check.py` measures both.
BACKENDS = ("pallas_gpu", "tpu_paged", "xla")
# Backends that also register "<name>_interpret": the same kernels run by an interpreter (CPU CI).
INTERPRET_BACKENDS = ("pallas_gpu",)
_BACKEND_MODULES = {"pallas_gpu": "decode_kernel", "tpu_paged": "decode_tpu_paged"}
_DEFAULT_ORDER = {"gpu": ("pallas_gpu", "xla"), "tpu": ("tpu_paged", "xla")}


def paged_decode_reference(q, k_pages, v_pages, block_tables, lengths, *, layout, scale,
                           v_head_dim):
    """Plain jnp: gather each sequence's pages into [B, N*L, G, D] and run the reference."""
    batch, s_len = q.shape[:2]
    page = k_pages.shape[1]
    k = k_pages[block_tables].reshape(batch, -1, *k_pages.shape[2:])
    v = k[..., :v_head_dim] if v_pages is None else v_pages[block_tables].reshape(
        batch, -1, *v_pages.shape[2:])
    slots = jnp.arange(k.shape[1], dtype=jnp.int32)[None, :]
    kv_positions = jnp.where(slots < lengths[:, None], slots, -1)
    q_positions = lengths[:, None] - s_len + jnp.arange(s_len, dtype=jnp.int32)[None, :]
    del page
    return attention_reference(q, k, v, layout=layout, q_positions=q_positions.astype(jnp.int32),
                               kv_positions=kv_positions, scale=scale)


def visit_width(layout: masks.Layout, s_len: int, page: int, max_pages: int) -> int:
    """Static bound on the pages one sequence visits (the kernel's step count)."""
    if isinstance(layout, masks.LozaLayout):
        sink = math.ceil(layout.sink_blocks * layout.block_size / page)
        recent = math.ceil((layout.local_blocks * layout.block_size + s_len) / page) + 1
        return min(max_pages, sink + recent)
    if isinstance(layout, masks.SlidingWindowLayout):
        return min(max_pages, math.ceil((layout.window + s_len) / page) + 1)
    return max_pages


def visit_plan(layout: masks.Layout, lengths, s_len: int, page: int, max_pages: int):
    """Traced: (pages [B, W] logical page indices to visit, count [B]); a sink range then a
    recent range for LoZA and windows, every written page otherwise."""
    width = visit_width(layout, s_len, page, max_pages)
    used = (lengths + page - 1) // page
    first_q = jnp.maximum(lengths - s_len, 0)
    sink_pages = jnp.zeros_like(lengths)
    recent_start = jnp.zeros_like(lengths)  # first visible position of the earliest query
    if isinstance(layout, masks.LozaLayout):
        sink_end = layout.sink_blocks * layout.block_size
        sink_pages = jnp.minimum(-(-sink_end // page), used)
        recent_start = (first_q // layout.block_size - (layout.local_blocks - 1)) * layout.block_size
    elif isinstance(layout, masks.SlidingWindowLayout):
        recent_start = first_q - layout.window + 1
    recent_first = jnp.maximum(jnp.maximum(recent_start, 0) // page, sink_pages)
    count = sink_pages + jnp.maximum(used - recent_first, 0)
    slot = jnp.arange(width, dtype=jnp.int32)[None, :]
    pages = jnp.where(slot < sink_pages[:, None], slot,
                      recent_first[:, None] + slot - sink_pages[:, None])
    pages = jnp.clip(pages, 0, max_pages - 1).astype(jnp.int32)
    return pages, jnp.minimum(count, width).astype(jnp.int32)


def _load(module: ModuleType, interpret: bool) -> Callable:
    if interpret:
        return functools.partial(module.paged_decode_attention, interpret=True)
    return module.paged_decode_attention


# Built after the reference and visit_plan exist: the kernel modules import this one.
REGISTRY = Registry(__package__, BACKENDS, _DEFAULT_ORDER, interpret=INTERPRET_BACKENDS,
                    load=_load, builtin={"xla": paged_decode_reference}, modules=_BACKEND_MODULES)
KNOWN_IMPLEMENTATIONS = REGISTRY.names


def paged_decode_attention(
    q: Float[Array, "B S H Dk"],
    k_pages: Float[Array, "P L G Dk"],
    v_pages: Float[Array, "P L G Dv"] | None,
    block_tables: Int[Array, "B N"],
    lengths: Int[Array, " B"],
    *,
    layout: masks.Layout,
    scale: float | None = None,
    v_head_dim: int | None = None,
    implementation: str | None = None,
) -> Float[Array, "B S H _Dv"]:
    """Attention of S new tokens per sequence over its pages, restricted to `layout`.

    Args:
      q: [B, S, H, Dk] queries of the last S tokens of each sequence (S small: 1 to a few).
      k_pages, v_pages: page pools [P, L, G, D]; `v_pages=None` reads values as the first
        `v_head_dim` dims of the key pages (absorbed MLA: Dk=576, Dv=512, G=1).
      block_tables: int [B, N] physical page of each logical page.
      lengths: int [B] tokens in each sequence's cache, the S new ones included (>= S).
      layout: evaluated on absolute positions (LoZA: only sink and local pages are read).
      scale: softmax scale, default Dk ** -0.5.
      implementation: one of KNOWN_IMPLEMENTATIONS, or None for the platform's default.

    Returns:
      [B, S, H, Dv] in q.dtype. Cost: pages visited per sequence = `visit_width(...)`.
    """
    batch, s_len, num_heads, d_k = q.shape
    if k_pages.ndim != 4 or block_tables.ndim != 2 or lengths.shape != (batch,):
        raise ValueError(f"shapes: k_pages {k_pages.shape} must be [P, L, G, Dk], block_tables "
                         f"{block_tables.shape} [B, N], lengths {lengths.shape} [B={batch}]")
    if k_pages.shape[3] != d_k or num_heads % k_pages.shape[2]:
        raise ValueError(f"k_pages {k_pages.shape} must have Dk={d_k} and G dividing H="
                         f"{num_heads}")
    if v_pages is None:
        if v_head_dim is None or not 0 < v_head_dim <= d_k:
            raise ValueError(f"v_pages=None needs 0 < v_head_dim <= Dk={d_k}, got {v_head_dim}")
    else:
        if v_pages.shape[:3] != k_pages.shape[:3]:
            raise ValueError(f"v_pages {v_pages.shape} must match k_pages {k_pages.shape} in "
                             "[P, L, G]")
        v_head_dim = v_pages.shape[3]
    if not isinstance(layout, masks.Layout):
        raise ValueError(f"layout={layout!r} must be a Layout")
    scale = d_k**-0.5 if scale is None else float(scale)
    kwargs = dict(layout=layout, scale=scale, v_head_dim=v_head_dim)
    return REGISTRY.select(implementation, lambda name, backend: backend(
        q, k_pages, v_pages, block_tables, lengths, **kwargs))
