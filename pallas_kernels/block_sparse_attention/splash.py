"""The "splash" backend: `jax.experimental.pallas.ops.tpu.splash_attention` on TPU.

The layout becomes a splash mask (`CausalMask`, `LocalMask`, `FullMask`, or a `NumpyMask` from
`layout.to_dense` for LoZA and composed layouts), so splash visits only the blocks that mask
touches; packed documents go in as its `SegmentIds`. Grouped kv heads run the MQA kernel once per
kv head. Default positions only (the mask is static), S and T multiples of the block size, no
log-sum-exp output; otherwise NotImplementedError. `interpret=True` ("splash_interpret") runs
the same kernel through Pallas' interpreter on any platform.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import masks

# Raises ImportError where this jax has no splash attention: the registry then lists the reason.
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _mask

__all__ = ["block_sparse_attention", "splash_mask"]

NAME = "splash"
_BLOCKS = (512, 256, 128)  # tried in order; the first dividing S and T is used


def splash_mask(layout: masks.Layout, s_len: int, t_len: int) -> _mask.Mask:
    """The splash mask of `layout` on aranges: a computable mask where one exists, else dense."""
    shape = (s_len, t_len)
    if isinstance(layout, masks.CausalLayout):
        return _mask.CausalMask(shape)
    if isinstance(layout, masks.FullLayout):
        return _mask.FullMask(shape)
    if isinstance(layout, masks.SlidingWindowLayout):
        return _mask.LocalMask(shape, window_size=(layout.window - 1, 0), offset=0)
    return _mask.NumpyMask(layout.to_dense(s_len, t_len))


def _block(s_len: int, t_len: int) -> int | None:
    for block in _BLOCKS:
        if s_len % block == 0 and t_len % block == 0:
            return block
    return None  # the interpreter checks the same tiling rules


@functools.lru_cache(maxsize=64)
def _make_kernel(layout: masks.Layout, s_len: int, t_len: int, n_rep: int, block: int,
                 interpret: bool):
    mask = _mask.MultiHeadMask([splash_mask(layout, s_len, t_len)] * n_rep)
    sizes = _kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                               block_q_dkv=block, block_kv_dkv=block,
                               block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return _kernel.make_splash_mqa_single_device(mask=mask, block_sizes=sizes,
                                                 interpret=interpret)


def block_sparse_attention(q, k, v, *, layout, q_positions=None, kv_positions=None,
                           q_segment_ids=None, kv_segment_ids=None, scale, return_lse=False,
                           interpret: bool = False):
    """See `api.block_sparse_attention`."""
    if not interpret and jax.default_backend() != "tpu":
        raise NotImplementedError(f"{NAME}: platform={jax.default_backend()!r} is not supported; "
                                  "supported: ('tpu',), or interpret=True on any platform")
    if q_positions is not None or kv_positions is not None:
        raise NotImplementedError(f"{NAME}: explicit positions are not supported (the mask is "
                                  "static); supported: default positions (arange)")
    if return_lse:
        raise NotImplementedError(f"{NAME}: return_lse=True is not supported; supported: False")
    if q.shape[3] != v.shape[3]:
        raise NotImplementedError(f"{NAME}: Dk={q.shape[3]} != Dv={v.shape[3]} is not "
                                  "supported; supported: equal head dims")
    batch, s_len, num_heads, _ = q.shape
    t_len, num_groups = k.shape[1], k.shape[2]
    block = _block(s_len, t_len)
    if block is None:
        raise NotImplementedError(f"{NAME}: S={s_len}, T={t_len} are not multiples of a block "
                                  f"size in {_BLOCKS}")
    n_rep = num_heads // num_groups
    kernel = _make_kernel(layout, s_len, t_len, n_rep, block, interpret)
    # Splash scales nothing itself: fold the scale into q. [B, G, N, S, D] for the MQA kernel.
    q_bgnsd = jnp.einsum("BSGND->BGNSD", (q * scale).reshape(batch, s_len, num_groups, n_rep, -1))
    k_bgtd = jnp.einsum("BTGD->BGTD", k)
    v_bgtd = jnp.einsum("BTGD->BGTD", v)
    if q_segment_ids is None:
        run = jax.vmap(jax.vmap(kernel))  # over B, then G
        out = run(q_bgnsd, k_bgtd, v_bgtd)
    else:
        seg = _kernel.SegmentIds(q=q_segment_ids.astype(jnp.int32),
                                 kv=kv_segment_ids.astype(jnp.int32))
        run = jax.vmap(jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s),
                                in_axes=(0, 0, 0, None)))
        out = run(q_bgnsd, k_bgtd, v_bgtd, seg)
    return jnp.einsum("BGNSD->BSGND", out).reshape(batch, s_len, num_heads, -1).astype(q.dtype)
