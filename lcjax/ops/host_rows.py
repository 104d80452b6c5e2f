"""Row gathers and scatters that work wherever the table lives: device memory or host memory.

A table placed in host memory (`pinned_host`, see lcjax/sparsity/host_offload.py) cannot be
indexed by a device computation. When the traced table's memory space is the host, the indices
go to the host, the gather (or scatter) runs there (compute type "device_host"), and only the
selected rows come to the device, so a step moves rows, never the table. On device tables these
are plain indexing. Callers (the N-gram embedding, the A²ATS paged cache) need not know where
their table is.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import compute_on as _compute_on
from jax.typing import ArrayLike
from jaxtyping import Array, Int


def on_host(x: Array) -> bool:
    """Whether the (traced or concrete) array lives in host memory."""
    return jax.typeof(x).memory_space == jax.memory.Space.Host


# The function form of compute_on: `compute_on2` up to jax 0.10, `compute_on` itself from jax
# 0.11 (before that, compute_on was a context manager taking one positional compute type).
_COMPUTE_ON = (_compute_on.compute_on
               if "out_memory_spaces" in inspect.signature(_compute_on.compute_on).parameters
               else _compute_on.compute_on2)


def _host_call(fn, *args: Array) -> Array:
    """fn(*args) computed on the host, its result left in host memory."""
    return _COMPUTE_ON(fn, compute_type="device_host",
                       out_memory_spaces=jax.memory.Space.Host)(*args)


def take_rows(table: ArrayLike, ids: Int[Array, "..."]) -> Array:
    """table[ids] along axis 0 ([..., *table.shape[1:]], on the device); ids are in range."""
    if isinstance(table, np.ndarray):  # host numpy params (an un-jitted apply): plain indexing
        table = jnp.asarray(table)
    if not on_host(table):
        return table[ids]
    ids = jax.device_put(ids, jax.memory.Space.Host)
    rows = _host_call(lambda t, i: t[i], table, ids)
    return jax.device_put(rows, jax.memory.Space.Device)


def set_rows(table: Array, ids: Int[Array, "N"], rows: Array) -> Array:
    """table with rows [N, *table.shape[1:]] written at ids (out of range: dropped), kept in the
    memory it lives in."""
    rows = rows.astype(table.dtype)
    if not on_host(table):
        return table.at[ids].set(rows, mode="drop")
    ids = jax.device_put(ids, jax.memory.Space.Host)
    rows = jax.device_put(rows, jax.memory.Space.Host)
    return _host_call(lambda t, i, r: t.at[i].set(r, mode="drop"), table, ids, rows)
