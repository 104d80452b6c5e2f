"""What the model records about each quantizable matmul input while calibrating.

The model calls `record(module, name, x)` (dense) or `record_grouped(...)` (MoE experts) before
each weight matmul. Nothing is computed unless the caller made the collection mutable:
`STATS` (per input channel max|x| and a row count; always cheap) and `GRAM` (sum of x xᵀ, K² per
input: only for recipes that search clipping on the output error). lcjax.quant.calibrate reads
them; the hooks live here so the model needs nothing from lcjax.quant.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

STATS = "quant_stats"
GRAM = "quant_gram"
COLLECTIONS = (STATS, GRAM)


def _wanted(module: nn.Module) -> tuple[bool, bool]:
    """Which collections to fill: only when calibrating (init makes every collection mutable)."""
    if module.is_initializing():
        return False, False
    return tuple(module.is_mutable_collection(c) for c in COLLECTIONS)


def record(module: nn.Module, name: str, x: Float[Array, "..."], kdims: int = 1) -> None:
    """Sow stats of x (rows: all leading dims; channels: the trailing `kdims` dims, flattened)."""
    want_stats, want_gram = _wanted(module)
    if not (want_stats or want_gram):
        return
    k = 1
    for d in x.shape[x.ndim - kdims:]:
        k *= d
    x2 = x.reshape(-1, k).astype(jnp.float32)
    if want_stats:
        module.sow(STATS, name, {"absmax": jnp.max(jnp.abs(x2), axis=0),
                                 "count": jnp.asarray(x2.shape[0], jnp.float32)})
    if want_gram:
        module.sow(GRAM, name, jnp.einsum("TK,TJ->KJ", x2, x2, precision=jax.lax.Precision.HIGHEST))


def record_grouped(module: nn.Module, name: str, x: Float[Array, "R K"],
                   group_sizes: Int[Array, "E"]) -> None:
    """Per-expert stats of rows sorted by expert (rows past sum(group_sizes) are ignored)."""
    want_stats, want_gram = _wanted(module)
    if not (want_stats or want_gram):
        return
    e = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    expert = jnp.searchsorted(ends, jnp.arange(x.shape[0], dtype=jnp.int32), side="right")
    x32 = x.astype(jnp.float32)
    if want_stats:
        absmax = jax.ops.segment_max(jnp.abs(x32), expert, num_segments=e + 1)[:e]
        module.sow(STATS, name, {"absmax": jnp.maximum(absmax, 0.0),  # empty experts: -inf -> 0
                                 "count": group_sizes.astype(jnp.float32)})
    if want_gram:
        onehot = jax.nn.one_hot(expert, e, dtype=jnp.float32)  # [R, E]; past-the-end rows: 0
        module.sow(GRAM, name, jnp.einsum("RE,RK,RJ->EKJ", onehot, x32, x32,
                                          precision=jax.lax.Precision.HIGHEST))
