"""The "xla_gather" backend: the active rows of w, a block at a time, in a plain XLA loop.

XLA needs static shapes, so the active rows are visited in blocks of `block_k`: a while loop
of ceil(count / block_k) trips (the count read at run time), each gathering its block of rows
of w (only those are read) and adding x[:, block] @ w[block] to a float32 accumulator. The last
block's padding repeats the first active row and meets zero activations. Any number of rows.
(Measured on a 2-core CPU, scripts/bench_sparse_gemv.py: one gather of every active row, or a
lax.switch over capacity buckets, copies w into the branch and runs 2-10x the dense GEMV.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_gemv.reference import active_rows

NAME = "xla_gather"


@dataclasses.dataclass(frozen=True)
class Config:
    """block_k: active rows gathered per loop trip (small blocks stay in cache)."""

    block_k: int = 64

    def __post_init__(self):
        if not isinstance(self.block_k, int) or isinstance(self.block_k, bool) or self.block_k < 1:
            raise ValueError(f"Config.block_k={self.block_k!r} must be a positive int")


def check(x, w, *, config=None, interpret=False) -> None:
    del x, w, interpret
    if config is not None and not isinstance(config, Config):
        raise ValueError(f"config={config!r} must be a {NAME}.Config")


def sparse_gemv(x, w, *, config=None, interpret=False):
    check(x, w, config=config)
    t, k = x.shape
    bk = min((config or Config()).block_k, k)
    k_pad = -(-k // bk) * bk
    idx, count = active_rows(x)
    idx = jnp.pad(idx, (0, k_pad - k), mode="edge")
    live = jnp.arange(k_pad)[None, :] < count[0]
    x_act = jnp.where(live, jnp.take(x, idx, axis=1), jnp.zeros((), x.dtype)).astype(jnp.float32)

    def step(j, acc):
        rows = jax.lax.dynamic_slice(idx, (j * bk,), (bk,))
        xs = jax.lax.dynamic_slice(x_act, (0, j * bk), (t, bk))
        ws = w.at[rows].get(mode="promise_in_bounds", indices_are_sorted=True).astype(jnp.float32)
        return acc + jnp.dot(xs, ws, precision=jax.lax.Precision.HIGHEST)

    acc = jax.lax.fori_loop(0, (count[0] + bk - 1) // bk, step,
                            jnp.zeros((t, w.shape[1]), jnp.float32))
    return acc.astype(x.dtype)
