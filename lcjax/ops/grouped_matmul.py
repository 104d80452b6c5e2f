"""Grouped (ragged) matmul for MoE experts: rows sorted by group times a per-group weight.

One public function with `implementation=`; "xla" is `jax.lax.ragged_dot` and defines the result.
Kernel backends (pallas_kernels.grouped_matmul) plug in here without touching the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

IMPLEMENTATIONS = ("xla",)


def grouped_matmul(x: Float[Array, "N K"], w: Float[Array, "G K F"], group_sizes: Int[Array, "G"],
                   *, implementation: str = "xla") -> Float[Array, "N F"]:
    """out[i] = x[i] @ w[g(i)] where rows are grouped contiguously; rows past sum(group_sizes) are 0."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"grouped_matmul: implementation={implementation!r} is not one of "
                         f"{list(IMPLEMENTATIONS)}")
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1] or group_sizes.shape != (w.shape[0],):
        raise ValueError(f"grouped_matmul: shapes x{x.shape} w{w.shape} group_sizes"
                         f"{group_sizes.shape} do not match [N,K] x [G,K,F] with [G] sizes")
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes.astype(jnp.int32))
