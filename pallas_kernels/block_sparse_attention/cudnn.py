"""The "cudnn" backend: cuDNN flash attention through `jax.nn.dot_product_attention`.

Covers what cuDNN expresses without a dense mask: causal, sliding-window and full layouts on
default positions, bf16/fp16, no segment ids, no log-sum-exp output. Everything else (LoZA
layouts, packed documents, cache slots) raises NotImplementedError, and the default order moves
on to our kernels. Values narrower than keys (MLA: Dk=192, Dv=128) are zero-padded to Dk, since
cuDNN wants one head dim; the padded output columns are dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import masks

__all__ = ["block_sparse_attention", "cudnn_arguments"]

NAME = "cudnn"
_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_arguments(layout: masks.Layout) -> dict:
    """`is_causal` / `local_window_size` of `jax.nn.dot_product_attention` for `layout`."""
    if isinstance(layout, masks.CausalLayout):
        return dict(is_causal=True)
    if isinstance(layout, masks.SlidingWindowLayout):
        return dict(is_causal=True, local_window_size=(layout.window - 1, 0))
    if isinstance(layout, masks.FullLayout):
        return dict(is_causal=False)
    raise NotImplementedError(f"{NAME}: layout={layout!r} is not supported; supported: "
                              "CausalLayout, SlidingWindowLayout, FullLayout")


def block_sparse_attention(q, k, v, *, layout, q_positions=None, kv_positions=None,
                           q_segment_ids=None, kv_segment_ids=None, scale, return_lse=False):
    """See `api.block_sparse_attention`."""
    if jax.default_backend() != "gpu":
        raise NotImplementedError(f"{NAME}: platform={jax.default_backend()!r} is not supported; "
                                  "supported: ('gpu',)")
    if q.dtype not in _DTYPES:
        raise NotImplementedError(f"{NAME}: dtype={q.dtype} is not supported; supported: "
                                  f"{[jnp.dtype(d).name for d in _DTYPES]}")
    if q_positions is not None or kv_positions is not None:
        raise NotImplementedError(f"{NAME}: explicit positions are not supported; supported: "
                                  "default positions (arange)")
    if q_segment_ids is not None:
        raise NotImplementedError(f"{NAME}: segment ids are not supported; supported: one "
                                  "sequence per row")
    if return_lse:
        raise NotImplementedError(f"{NAME}: return_lse=True is not supported; supported: False")
    if q.shape[1] != k.shape[1] and not isinstance(layout, masks.FullLayout):
        raise NotImplementedError(f"{NAME}: causal layouts with S={q.shape[1]} != "
                                  f"T={k.shape[1]} are not supported; supported: S == T")
    args = cudnn_arguments(layout)
    d_k, d_v = q.shape[3], v.shape[3]
    if d_v > d_k:
        raise NotImplementedError(f"{NAME}: Dv={d_v} > Dk={d_k} is not supported")
    v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, d_k - d_v)))
    out = jax.nn.dot_product_attention(q, k, v_pad, scale=scale, implementation="cudnn", **args)
    return out[..., :d_v]
