"""block_sparse_attention: one public function, backends chosen by `implementation=`.

Backends are filled by guarded imports. Each takes the validated arguments of
`block_sparse_attention` (scale already resolved to a float) and either computes the result or
raises NotImplementedError naming what it cannot do. `implementation=None` tries the platform's
default order, which always ends with "xla" (the reference); naming an implementation never falls
back to another.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from pallas_kernels.block_sparse_attention.masks import Layout
from pallas_kernels.block_sparse_attention.reference import attention_reference

# Backends with kernels; modules are <name>.py in this package. Each also registers
# "<name>_interpret": the same kernels run by an interpreter (CPU CI runs this).
_KERNEL_BACKENDS = ("pallas_tpu", "pallas_gpu", "triton")
# Every name a backend may register under.
KNOWN_IMPLEMENTATIONS = _KERNEL_BACKENDS + ("xla",) + tuple(
    f"{name}_interpret" for name in _KERNEL_BACKENDS)
_DEFAULT_ORDER = {
    "tpu": ("pallas_tpu", "xla"),
    "gpu": ("pallas_gpu", "triton", "xla"),
}

_IMPLEMENTATIONS: dict[str, Callable] = {"xla": attention_reference}
_UNAVAILABLE: dict[str, str] = {}  # name -> why its import failed

for _name in _KERNEL_BACKENDS:
    try:
        _module = importlib.import_module(f"{__package__}.{_name}")
    except ImportError as e:  # its optional dependency is missing
        _UNAVAILABLE[_name] = _UNAVAILABLE[f"{_name}_interpret"] = f"{type(e).__name__}: {e}"
    else:
        _IMPLEMENTATIONS[_name] = _module.block_sparse_attention
        _IMPLEMENTATIONS[f"{_name}_interpret"] = functools.partial(
            _module.block_sparse_attention, interpret=True)


def available_implementations() -> tuple[str, ...]:
    """Registered backends, in KNOWN_IMPLEMENTATIONS order."""
    return tuple(n for n in KNOWN_IMPLEMENTATIONS if n in _IMPLEMENTATIONS)


def default_order(platform: str | None = None) -> tuple[str, ...]:
    """Registered backends tried by `implementation=None` on `platform` (default: jax's)."""
    platform = jax.default_backend() if platform is None else platform
    return tuple(n for n in _DEFAULT_ORDER.get(platform, ("xla",)) if n in _IMPLEMENTATIONS)


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
    if implementation is not None:
        return _lookup(implementation)(q, k, v, **kwargs)
    order = default_order()
    for name in order[:-1]:
        try:
            return _IMPLEMENTATIONS[name](q, k, v, **kwargs)
        except NotImplementedError:
            continue  # this backend cannot run the case; the next one in the order may
    return _IMPLEMENTATIONS[order[-1]](q, k, v, **kwargs)


def _lookup(implementation) -> Callable:
    if implementation not in KNOWN_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not one of "
                         f"{KNOWN_IMPLEMENTATIONS} (or None for the default)")
    if implementation not in _IMPLEMENTATIONS:
        raise NotImplementedError(
            f"implementation={implementation!r} is not available here "
            f"({_UNAVAILABLE.get(implementation, 'not registered')}); available: "
            f"{available_implementations()}")
    return _IMPLEMENTATIONS[implementation]


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
