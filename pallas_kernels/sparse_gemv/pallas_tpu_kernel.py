"""Pallas TPU (Mosaic) kernel: y = x_act @ w[idx], DMA-ing only the active rows of w.

Grid (n tiles, K positions). The active row ids and their count are scalar-prefetched into SMEM;
the weight BlockSpec's index map sends position k to row idx[min(k, count-1)], so positions past
the count repeat the last block index and Pallas issues no new DMA for them (their compute is
skipped too). w is viewed as [K, 1, N] so a one-row block meets Mosaic's tiling rule (its last
two dims (1, block_n) span the full second-to-last dim). Each step adds x_act[k][:, None] ·
w[row] (VPU outer product) to a float32 accumulator in VMEM. One row per step: correct and
simple, not yet tuned (several rows per step need manual DMAs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _kernel(idx_ref, count_ref, x_ref, w_ref, o_ref, acc_ref):
    k = pl.program_id(1)

    @pl.when(k == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(k < count_ref[0])
    def _accumulate():
        xk = x_ref[0].astype(jnp.float32)  # [T, 1]
        acc_ref[...] += xk * w_ref[0].astype(jnp.float32)  # [T, 1] * [1, bn]

    @pl.when(k == pl.num_programs(1) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def sparse_gemv(idx, count, x_act, w, *, block_n: int, interpret):
    """idx [K] (active rows first), count [1], x_act [K, T, 1] (x[:, idx[k]] at position k),
    w [K, N] -> [T, N] in x_act.dtype; block_n divides N."""
    k_dim, t, _ = x_act.shape
    n_dim = w.shape[1]

    def row(k, idx_ref, count_ref):
        return idx_ref[jnp.minimum(k, jnp.maximum(count_ref[0] - 1, 0))]

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(n_dim // block_n, k_dim),
        in_specs=[
            pl.BlockSpec((1, t, 1), lambda n, k, idx_ref, count_ref: (
                jnp.minimum(k, jnp.maximum(count_ref[0] - 1, 0)), 0, 0)),
            pl.BlockSpec((1, 1, block_n), lambda n, k, idx_ref, count_ref: (
                row(k, idx_ref, count_ref), 0, n)),
        ],
        out_specs=pl.BlockSpec((t, block_n), lambda n, k, idx_ref, count_ref: (0, n)),
        scratch_shapes=[pltpu.VMEM((t, block_n), jnp.float32)],
    )
    return pl.pallas_call(
        _kernel,
        out_shape=jax.ShapeDtypeStruct((t, n_dim), x_act.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="sparse_gemv",
    )(idx, count, x_act, w.reshape(k_dim, 1, n_dim))
