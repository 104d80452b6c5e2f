"""The "tpu_paged" paged-decode backend: `jax.experimental.pallas.ops.tpu.paged_attention`.

That kernel attends one new token per sequence to all of its cached tokens (no layout), with kv
heads leading its page pools ([G, P, L, D]) and no softmax scale. So this backend takes S == 1
with a layout that lets the last token see every earlier one (causal, full), folds the scale into
q, and transposes the pools ([P, L, G, D] -> [G, P, L, D], a copy of the pool per call; the
device check measures whether the kernel still wins). With `v_pages=None` (absorbed MLA) values
are the key pages and the output keeps the first `v_head_dim` dims. Anything else, and any
platform but TPU, raises NotImplementedError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import masks

# Raises ImportError where this jax has no TPU paged attention: the registry records why.
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as _tpu_kernel

__all__ = ["kernel_arguments", "paged_decode_attention"]

NAME = "tpu_paged"


def kernel_arguments(q, k_pages, v_pages, block_tables, lengths, *, layout, scale):
    """The kernel's (q [B, H, D], k_pages, v_pages [G, P, L, D], lengths, page_indices) and
    `pages_per_compute_block`; raises NotImplementedError for what the kernel cannot express."""
    if q.shape[1] != 1:
        raise NotImplementedError(f"{NAME}: S={q.shape[1]} new tokens per sequence is not "
                                  "supported; supported: S == 1")
    if not isinstance(layout, (masks.CausalLayout, masks.FullLayout)):
        raise NotImplementedError(f"{NAME}: layout={layout!r} is not supported; supported: "
                                  "CausalLayout, FullLayout (the last token sees every key)")
    if v_pages is None:
        v_pages = k_pages
    elif v_pages.shape[3] != k_pages.shape[3]:
        raise NotImplementedError(f"{NAME}: Dv={v_pages.shape[3]} != Dk={k_pages.shape[3]} is "
                                  "not supported; supported: equal head dims or v_pages=None")
    pages_per_seq = block_tables.shape[1]
    block = next(b for b in (8, 4, 2, 1) if pages_per_seq % b == 0)
    to_kernel = lambda pages: jnp.einsum("PLGD->GPLD", pages)
    return ((q[:, 0] * jnp.asarray(scale, q.dtype), to_kernel(k_pages), to_kernel(v_pages),
             lengths.astype(jnp.int32), block_tables.astype(jnp.int32)), block)


def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, layout, scale,
                           v_head_dim):
    """See `decode.paged_decode_attention`."""
    if jax.default_backend() != "tpu":
        raise NotImplementedError(f"{NAME}: platform={jax.default_backend()!r} is not supported; "
                                  "supported: ('tpu',)")
    args, block = kernel_arguments(q, k_pages, v_pages, block_tables, lengths, layout=layout,
                                   scale=scale)
    out = _tpu_kernel(*args, pages_per_compute_block=block)  # [B, H, D]
    return out[:, None, :, :v_head_dim].astype(q.dtype)
