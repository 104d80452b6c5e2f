"""Pallas TPU (Mosaic) kernels for gmm and tgmm, MegaBlocks style.

The tile map (metadata.tile_visits: group id, bm-aligned row tile and group row ranges per grid
step) is computed on device from group_sizes and passed as scalar prefetch, so block index maps
read it from SMEM. The grid's visit axis has a traced length: only useful visits run.

gmm: grid (n tiles, visits, k tiles). A row tile straddling group boundaries is visited once per
group, back to back; each visit stores its group's rows of the f32 accumulator into the resident
output block (a masked select), so the block is complete when the visits move on. The tail rows
(past sum(group_sizes)) get a visit of their own whose accumulator stays zero.

tgmm: grid (k tiles, n tiles, visits). Consecutive visits of one group accumulate
lhs_tile^T @ rhs_tile with rows of other groups masked to zero; the [bk, bn] block of out[g] is
stored on the group's last visit. Every group, empty ones included, gets at least one visit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul import metadata


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _mask_k(x, k_i, *, block_k: int, k_dim: int, axis: int):
    """Zero the columns of the last, partial k block (its padding is undefined, maybe NaN)."""
    if k_dim % block_k == 0:
        return x
    k = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis) + k_i * block_k
    return jnp.where(k < k_dim, x, jnp.zeros_like(x))


def _gmm_kernel(group_ids, m_tile_ids, offsets, lhs_ref, rhs_ref, out_ref, acc_ref, *,
                block_m, block_k, k_dim, transpose_rhs, num_groups):
    visit, k_i = pl.program_id(1), pl.program_id(2)
    group = group_ids[visit]

    @pl.when(k_i == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(group < num_groups)  # the tail visit keeps a zero accumulator
    def _accumulate():
        lhs = _mask_k(lhs_ref[...], k_i, block_k=block_k, k_dim=k_dim, axis=1)
        rhs = _mask_k(rhs_ref[...], k_i, block_k=block_k, k_dim=k_dim,
                      axis=1 if transpose_rhs else 0)
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        acc_ref[...] += jax.lax.dot_general(lhs, rhs, dims, precision=_precision(lhs.dtype),
                                            preferred_element_type=jnp.float32)

    @pl.when(k_i == pl.num_programs(2) - 1)
    def _store():
        rows = m_tile_ids[visit] * block_m + jax.lax.broadcasted_iota(
            jnp.int32, acc_ref.shape, 0)
        mine = (rows >= offsets[group]) & (rows < offsets[group + 1])
        # Other rows keep what an earlier visit of this block stored (or will get a later one).
        out_ref[...] = jnp.where(mine, acc_ref[...],
                                 out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool, out_dtype, block_m: int, block_k: int,
        block_n: int, interpret):
    """lhs [T, K] x rhs [G, K, N] (or [G, N, K]) -> [T, N]; see the module docstring."""
    num_rows, k_dim = lhs.shape
    num_groups = rhs.shape[0]
    n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    visits = metadata.tile_visits(group_sizes, num_rows, block_m, with_tail=True,
                                  visit_empty=False)
    last_group = num_groups - 1

    def lhs_map(n_i, v, k_i, group_ids, m_tile_ids, offsets):
        return m_tile_ids[v], k_i

    def rhs_map(n_i, v, k_i, group_ids, m_tile_ids, offsets):
        group = jnp.minimum(group_ids[v], last_group)  # the tail visit reads (and ignores) G-1
        return (group, n_i, k_i) if transpose_rhs else (group, k_i, n_i)

    def out_map(n_i, v, k_i, group_ids, m_tile_ids, offsets):
        return m_tile_ids[v], n_i

    rhs_block = (pl.squeezed, block_n, block_k) if transpose_rhs else (
        pl.squeezed, block_k, block_n)
    kernel = functools.partial(_gmm_kernel, block_m=block_m, block_k=block_k, k_dim=k_dim,
                               transpose_rhs=transpose_rhs, num_groups=num_groups)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(_cdiv(n_dim, block_n), visits.num_visits, _cdiv(k_dim, block_k)),
        in_specs=[pl.BlockSpec((block_m, block_k), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
        out_specs=pl.BlockSpec((block_m, block_n), out_map),
        scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, n_dim), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL, pltpu.ARBITRARY, pltpu.ARBITRARY)),
        cost_estimate=pl.CostEstimate(
            flops=2 * num_rows * k_dim * n_dim, transcendentals=0,
            bytes_accessed=(lhs.size * lhs.dtype.itemsize * _cdiv(n_dim, block_n)
                            + rhs.size * rhs.dtype.itemsize
                            + num_rows * n_dim * jnp.dtype(out_dtype).itemsize)),
        interpret=_interpret_params(interpret),
        name="gmm",
    )(visits.group_ids, visits.m_tile_ids, visits.offsets, lhs, rhs)


def _tgmm_kernel(group_ids, m_tile_ids, offsets, lhs_ref, rhs_ref, out_ref, acc_ref, *,
                 block_m):
    visit, num_visits = pl.program_id(2), pl.num_programs(2)
    group = group_ids[visit]
    first = (visit == 0) | (group_ids[jnp.maximum(visit - 1, 0)] != group)
    last = (visit == num_visits - 1) | (group_ids[jnp.minimum(visit + 1, num_visits - 1)] != group)
    start, end = offsets[group], offsets[group + 1]

    @pl.when(first)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(end > start)
    def _accumulate():
        def rows_of_group(x):  # f32 select: other groups' rows and the padding become exact 0
            rows = m_tile_ids[visit] * block_m + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
            return jnp.where((rows >= start) & (rows < end), x.astype(jnp.float32), 0.0)

        lhs, rhs = rows_of_group(lhs_ref[...]), rows_of_group(rhs_ref[...])
        dtype = lhs_ref.dtype
        acc_ref[...] += jax.lax.dot_general(
            lhs.T.astype(dtype), rhs.astype(dtype), (((1,), (0,)), ((), ())),
            precision=_precision(dtype), preferred_element_type=jnp.float32)

    @pl.when(last)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs, rhs, group_sizes, *, out_dtype, block_m: int, block_k: int, block_n: int,
         interpret):
    """lhs [T, K], rhs [T, N] -> [G, K, N]; see the module docstring."""
    num_rows, k_dim = lhs.shape
    n_dim = rhs.shape[1]
    num_groups = group_sizes.shape[0]
    visits = metadata.tile_visits(group_sizes, num_rows, block_m, with_tail=False,
                                  visit_empty=True)

    def lhs_map(k_i, n_i, v, group_ids, m_tile_ids, offsets):
        return m_tile_ids[v], k_i

    def rhs_map(k_i, n_i, v, group_ids, m_tile_ids, offsets):
        return m_tile_ids[v], n_i

    def out_map(k_i, n_i, v, group_ids, m_tile_ids, offsets):
        return group_ids[v], k_i, n_i

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(_cdiv(k_dim, block_k), _cdiv(n_dim, block_n), visits.num_visits),
        in_specs=[pl.BlockSpec((block_m, block_k), lhs_map),
                  pl.BlockSpec((block_m, block_n), rhs_map)],
        out_specs=pl.BlockSpec((pl.squeezed, block_k, block_n), out_map),
        scratch_shapes=[pltpu.VMEM((block_k, block_n), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, block_m=block_m),
        out_shape=jax.ShapeDtypeStruct((num_groups, k_dim, n_dim), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)),
        cost_estimate=pl.CostEstimate(
            flops=2 * num_rows * k_dim * n_dim, transcendentals=0,
            bytes_accessed=(lhs.size * lhs.dtype.itemsize * _cdiv(n_dim, block_n)
                            + rhs.size * rhs.dtype.itemsize * _cdiv(k_dim, block_k)
                            + num_groups * k_dim * n_dim * jnp.dtype(out_dtype).itemsize)),
        interpret=_interpret_params(interpret),
        name="tgmm",
    )(visits.group_ids, visits.m_tile_ids, visits.offsets, lhs, rhs)


def _interpret_params(interpret):
    """False: compiled Mosaic. True: the generic Pallas interpreter (fast, any platform). A
    pltpu.InterpretParams: TPU interpret mode, which also simulates TPU memories (slower)."""
    return interpret
