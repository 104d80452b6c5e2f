"""block_sparse_attention: one public function, backends chosen by `implementation=`.

Backends are filled by guarded imports. Each takes the validated arguments of
`block_sparse_attention` (scale already resolved to a float) and either computes the result or
raises NotImplementedError naming what it cannot do. `implementation=None` tries the platform's
default order, which always ends with "xla" (block-skipping plain XLA, `xla_blocked.py`) and
"reference" (`reference.py`, the dense definition every backend must match, taken when "xla"
cannot run a case such as decode over cache slots); naming an implementation never falls back to
another. Kernel backends come first in their platform's order; `scripts/device_check.py` measures
whether a wrapped library kernel ("cudnn", "splash") should move ahead of ours.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Callable

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from pallas_kernels.block_sparse_attention.masks import Layout
from pallas_kernels.block_sparse_attention.reference import attention_reference
from pallas_kernels.registry import Registry

# Every backend: "reference" is the dense jnp definition; the others are modules of this package
# (<name>.py, or _BACKEND_MODULES[name]) with `block_sparse_attention(q, k, v, ...)`, taking
# `interpret=` when they are in INTERPRET_BACKENDS.
BACKENDS = ("pallas_tpu", "pallas_gpu", "triton", "splash", "cudnn", "xla", "reference")
# Backends that also register "<name>_interpret": the same kernels run by an interpreter (CPU CI).
INTERPRET_BACKENDS = ("pallas_tpu", "pallas_gpu", "triton", "splash")
_BACKEND_MODULES = {"xla": "xla_blocked"}
_LAST = ("xla", "reference")
_DEFAULT_ORDER = {
    "cpu": _LAST,
    "tpu": ("pallas_tpu", "splash") + _LAST,
    "gpu": ("pallas_gpu", "cudnn", "triton") + _LAST,
}


def _load(module: ModuleType, interpret: bool) -> Callable:
    if interpret:
        return functools.partial(module.block_sparse_attention, interpret=True)
    return module.block_sparse_attention


REGISTRY = Registry(__package__, BACKENDS, _DEFAULT_ORDER, interpret=INTERPRET_BACKENDS,
                    load=_load, builtin={"reference": attention_reference},
                    modules=_BACKEND_MODULES, fallback_order=_LAST)
# Every name a backend may register under.
KNOWN_IMPLEMENTATIONS = REGISTRY.names


def available_implementations() -> tuple[str, ...]:
    """Registered backends, in KNOWN_IMPLEMENTATIONS order."""
    return REGISTRY.available()


def default_order(platform: str | None = None) -> tuple[str, ...]:
    """Registered backends tried by `implementation=None` on `platform` (default: jax's)."""
    return REGISTRY.default_order(platform)


def block_sparse_attention(
    q: Float[Array, "B S H Dk"],
    k: Float[Array, "B T G Dk"],
    v: Float[Array, "B T G Dv"],
    *,
    layout: Layout,
    q_positions: Int[Array, "B S"] | None = None,
    kv_positions: Int[Array, "B T"] | None = None,
    q_segment_ids: Int[Array, "B S"] | None = None,
    kv_segment_ids: Int[Array, "B T"] | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
) -> Float[Array, "B S H Dv"] | tuple[Float[Array, "B S H Dv"], Float[Array, "B H S"]]:
    """Attention of q over (k, v) restricted to `layout`, segments and non-empty kv slots.

    Args:
      q: queries [B, S, H, Dk]; k: keys [B, T, G, Dk]; v: values [B, T, G, Dv]; one float dtype.
        H must be a multiple of G; query head h reads kv head h // (H // G).
      layout: a masks.Layout evaluated on absolute positions.
      q_positions, kv_positions: int [B, S] / [B, T]; default arange(S) / arange(T). A kv position
        < 0 marks an empty cache slot, never attended.
      q_segment_ids, kv_segment_ids: int [B, S] / [B, T], both or neither; attention stays within
        equal ids (packed sequences).
      scale: softmax scale; default Dk ** -0.5.
      return_lse: also return the float32 log-sum-exp [B, H, S] (-inf for rows with no key).
      implementation: one of KNOWN_IMPLEMENTATIONS, or None for the platform's default order.

    Returns:
      out [B, S, H, Dv] in q.dtype (0 for rows with no allowed key), and lse if requested.
    """
    scale = _validate(q, k, v, layout, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                      scale, return_lse)
    kwargs = dict(layout=layout, q_positions=q_positions, kv_positions=kv_positions,
                  q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
                  return_lse=return_lse)
    return REGISTRY.select(implementation, lambda name, backend: backend(q, k, v, **kwargs))


def _validate(q, k, v, layout, q_positions, kv_positions, q_segment_ids, kv_segment_ids, scale,
              return_lse) -> float:
    """Check ranks, shapes and dtypes; return the resolved scale."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have rank 4 [B, S|T, heads, D], got shape "
                             f"{getattr(x, 'shape', type(x))}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}.dtype={x.dtype} must be floating")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}; cast them to "
                         "one dtype")
    (batch, s_len, num_heads, d_k), (_, t_len, num_groups, _) = q.shape, k.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[3] != d_k:
        raise ValueError(f"k head dim {k.shape[3]} != q head dim {d_k} (q {q.shape}, "
                         f"k {k.shape})")
    if v.shape[1:3] != (t_len, num_groups):
        raise ValueError(f"v shape {v.shape} must match k shape {k.shape} in [T, G]")
    if num_groups == 0 or num_heads % num_groups:
        raise ValueError(f"query heads H={num_heads} must be a multiple of kv heads "
                         f"G={num_groups}")
    if not isinstance(layout, Layout):
        raise ValueError(f"layout={layout!r} must be a pallas_kernels.block_sparse_attention "
                         "Layout")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together, got "
                         f"q_segment_ids={_describe(q_segment_ids)}, "
                         f"kv_segment_ids={_describe(kv_segment_ids)}")
    for name, x, shape in (("q_positions", q_positions, (batch, s_len)),
                           ("kv_positions", kv_positions, (batch, t_len)),
                           ("q_segment_ids", q_segment_ids, (batch, s_len)),
                           ("kv_segment_ids", kv_segment_ids, (batch, t_len))):
        if x is None:
            continue
        if getattr(x, "shape", None) != shape:
            raise ValueError(f"{name} shape {_describe(x)} must be {shape}")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name}.dtype={x.dtype} must be an integer dtype")
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse={return_lse!r} must be a bool")
    if scale is None:
        return d_k**-0.5
    if (isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating))
            or not 0 < scale < math.inf):
        raise ValueError(f"scale={scale!r} must be a finite positive number (or None for "
                         f"Dk**-0.5 = {d_k**-0.5:.6g})")
    return float(scale)


def _describe(x) -> str:
    return "None" if x is None else str(getattr(x, "shape", type(x).__name__))
