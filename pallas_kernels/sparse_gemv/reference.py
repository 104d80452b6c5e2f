"""The result every sparse_gemv backend must give, and the active-row list they share.

    y[t, n] = Σ_k x[t, k] · w[k, n]     accumulated in float32, returned in x.dtype

A row k of w whose input channel is zero in every row of x (x[:, k] == 0) adds nothing, so a
backend may skip reading it; which rows it reads is the whole difference between backends.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def sparse_gemv_reference(x: Float[Array, "T K"], w: Float[Array, "K N"]) -> Float[Array, "T N"]:
    """x @ w as a dense matmul (float32 accumulation at full precision)."""
    y = jnp.dot(x, w.astype(x.dtype), precision=jax.lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def active_rows(x: Float[Array, "T K"]) -> tuple[Int[Array, "K"], Int[Array, "1"]]:
    """(the channels k with some x[t, k] != 0, ascending, padded to length K with the first of
    them (so a kernel's padding reads an active row); their count [1]).

    O(T·K) work on the activations only; the weights are untouched.
    """
    mask = jnp.any(x != 0, axis=0)
    idx = jnp.nonzero(mask, size=x.shape[1], fill_value=0)[0].astype(jnp.int32)
    count = jnp.sum(mask, dtype=jnp.int32)
    idx = jnp.where(jnp.arange(x.shape[1]) < count, idx, idx[0])
    return idx, count[None]
