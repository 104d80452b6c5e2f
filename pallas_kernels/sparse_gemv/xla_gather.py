"""The "xla_gather" backend: gather the active rows of w, then one matmul (plain jnp/XLA).

XLA needs static shapes, so the gathered block has one of `buckets` sizes K·b/buckets
(b = 1..buckets), the smallest that holds the active rows, chosen at run time by lax.switch
(only the chosen branch runs). Rows past the count meet zero activations. Any number of rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_gemv.reference import active_rows

NAME = "xla_gather"


@dataclasses.dataclass(frozen=True)
class Config:
    """buckets: how many gathered-block sizes (a finer grid wastes less, compiles more)."""

    buckets: int = 8

    def __post_init__(self):
        if not isinstance(self.buckets, int) or isinstance(self.buckets, bool) or self.buckets < 1:
            raise ValueError(f"Config.buckets={self.buckets!r} must be a positive int")


def check(x, w, *, config=None, interpret=False) -> None:
    del x, w, interpret
    if config is not None and not isinstance(config, Config):
        raise ValueError(f"config={config!r} must be a {NAME}.Config")


def sparse_gemv(x, w, *, config=None, interpret=False):
    check(x, w, config=config)
    k = x.shape[1]
    buckets = min((config or Config()).buckets, k)
    caps = [-(-k * (b + 1) // buckets) for b in range(buckets)]
    idx, count = active_rows(x)

    def branch(cap):
        def run():
            live = jnp.arange(cap) < count[0]
            xs = jnp.where(live[None, :], jnp.take(x, idx[:cap], axis=1), jnp.zeros((), x.dtype))
            rows = idx[:cap]
            ws = w.at[rows].get(mode="promise_in_bounds", indices_are_sorted=True)  # [cap, N]
            # float32 operands: XLA:CPU has no bf16 x bf16 -> f32 dot inside a conditional. (A
            # fused broadcast multiply + sum avoids the gathered copy but runs 5-10x slower.)
            return jnp.dot(xs.astype(jnp.float32), ws.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
        return run

    def nothing_active():  # no row read at all (idx would name row 0)
        return jnp.zeros((x.shape[0], w.shape[1]), x.dtype)

    which = jnp.clip((count[0] * buckets + k - 1) // k, 0, buckets)  # 0: no active channel
    return jax.lax.switch(which, [nothing_active] + [branch(c) for c in caps])
