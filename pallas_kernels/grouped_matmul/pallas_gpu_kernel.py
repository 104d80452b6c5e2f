"""Pallas GPU (Triton lowering) kernels for gmm and tgmm.

gmm: grid (n tiles, row tiles), n fastest, so the programs of one row tile run together and its
lhs rows are read from HBM once; a group's [K, bn] weight slices are shared by that group's row
tiles, which run back to back. Row tiles come from metadata.row_tiles: each starts at a group's
first row (never spans two groups), so every output row is stored by exactly one program and the
tail rows (past sum(group_sizes)) by a program that stores zeros. Idle tiles return at once.

tgmm: grid (n tiles, k tiles, groups); each program loops over its group's rows in chunks of
block_m (a dynamic trip count, lowered to scf.for and pipelined) and stores one [bk, bn] block of
out[g]; an empty group stores zeros.

Both accumulate in float32; float32 inputs use IEEE products (Precision.HIGHEST), not tf32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.grouped_matmul import metadata


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _gmm_kernel(tiles_ref, lhs_ref, rhs_ref, out_ref, *, block_m, block_n, block_k,
                transpose_rhs, num_groups):
    n_i, tile = pl.program_id(0), pl.program_id(1)
    group, start, end = tiles_ref[0, tile], tiles_ref[1, tile], tiles_ref[2, tile]
    num_rows, k_dim = lhs_ref.shape
    n_dim = out_ref.shape[1]
    rows = start + jnp.arange(block_m)
    cols = n_i * block_n + jnp.arange(block_n)
    row_span, col_span = pl.ds(start, block_m), pl.ds(n_i * block_n, block_n)
    store_mask = (rows < end)[:, None] & (cols < n_dim)[None, :]

    @pl.when((start < end) & (group < num_groups))
    def _matmul():
        def body(k_i, acc):
            ks = k_i * block_k + jnp.arange(block_k)
            k_span = pl.ds(k_i * block_k, block_k)
            # Rows of the next group are harmless (the store is masked); rows past T are not.
            lhs = plgpu.load(lhs_ref.at[row_span, k_span],
                             mask=(rows < num_rows)[:, None] & (ks < k_dim)[None, :], other=0)
            if transpose_rhs:  # rhs [G, N, K]: contract both operands' last dim
                rhs = plgpu.load(rhs_ref.at[group, col_span, k_span],
                                 mask=(cols < n_dim)[:, None] & (ks < k_dim)[None, :], other=0)
                dims = (((1,), (1,)), ((), ()))
            else:
                rhs = plgpu.load(rhs_ref.at[group, k_span, col_span],
                                 mask=(ks < k_dim)[:, None] & (cols < n_dim)[None, :], other=0)
                dims = (((1,), (0,)), ((), ()))
            return acc + jax.lax.dot_general(lhs, rhs, dims, precision=_precision(lhs.dtype),
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, pl.cdiv(k_dim, block_k), body,
                                jnp.zeros((block_m, block_n), jnp.float32))
        plgpu.store(out_ref.at[row_span, col_span], acc.astype(out_ref.dtype), mask=store_mask)

    @pl.when((start < end) & (group == num_groups))
    def _tail_rows_are_zero():
        plgpu.store(out_ref.at[row_span, col_span],
                    jnp.zeros((block_m, block_n), out_ref.dtype), mask=store_mask)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool, out_dtype, block_m: int, block_n: int,
        block_k: int, num_warps: int, num_stages: int, interpret: bool):
    """lhs [T, K] x rhs [G, K, N] (or [G, N, K]) -> [T, N]; see the module docstring."""
    num_rows, k_dim = lhs.shape
    num_groups = rhs.shape[0]
    n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiles = metadata.row_tiles(group_sizes, num_rows, block_m).table
    kernel = functools.partial(_gmm_kernel, block_m=block_m, block_n=block_n, block_k=block_k,
                               transpose_rhs=transpose_rhs, num_groups=num_groups)
    flops = 2 * num_rows * k_dim * n_dim
    bytes_accessed = (lhs.size * lhs.dtype.itemsize + rhs.size * rhs.dtype.itemsize
                      + num_rows * n_dim * jnp.dtype(out_dtype).itemsize)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, n_dim), out_dtype),
        grid=(pl.cdiv(n_dim, block_n), tiles.shape[1]),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0,
                                      bytes_accessed=bytes_accessed),
        interpret=interpret,
        name="gmm",
    )(tiles, lhs, rhs)


def _tgmm_kernel(offsets_ref, lhs_ref, rhs_ref, out_ref, *, block_m, block_n, block_k):
    n_i, k_i, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = offsets_ref[group], offsets_ref[group + 1]
    k_dim, n_dim = lhs_ref.shape[1], rhs_ref.shape[1]
    ks = k_i * block_k + jnp.arange(block_k)
    cols = n_i * block_n + jnp.arange(block_n)
    k_span, col_span = pl.ds(k_i * block_k, block_k), pl.ds(n_i * block_n, block_n)

    def body(chunk, acc):
        row0 = start + chunk * block_m
        row_ok = (row0 + jnp.arange(block_m)) < end  # also keeps other groups' rows out
        row_span = pl.ds(row0, block_m)
        lhs = plgpu.load(lhs_ref.at[row_span, k_span],
                         mask=row_ok[:, None] & (ks < k_dim)[None, :], other=0)
        rhs = plgpu.load(rhs_ref.at[row_span, col_span],
                         mask=row_ok[:, None] & (cols < n_dim)[None, :], other=0)
        return acc + jax.lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())),
                                         precision=_precision(lhs.dtype),
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, pl.cdiv(end - start, block_m), body,
                            jnp.zeros((block_k, block_n), jnp.float32))
    plgpu.store(out_ref.at[group, k_span, col_span], acc.astype(out_ref.dtype),
                mask=(ks < k_dim)[:, None] & (cols < n_dim)[None, :])


def tgmm(lhs, rhs, group_sizes, *, out_dtype, block_m: int, block_n: int, block_k: int,
         num_warps: int, num_stages: int, interpret: bool):
    """lhs [T, K], rhs [T, N] -> [G, K, N]; see the module docstring."""
    num_rows, k_dim = lhs.shape
    n_dim = rhs.shape[1]
    num_groups = group_sizes.shape[0]
    offsets = metadata.group_offsets(group_sizes, num_rows)
    kernel = functools.partial(_tgmm_kernel, block_m=block_m, block_n=block_n, block_k=block_k)
    flops = 2 * num_rows * k_dim * n_dim
    bytes_accessed = (lhs.size * lhs.dtype.itemsize + rhs.size * rhs.dtype.itemsize
                      + num_groups * k_dim * n_dim * jnp.dtype(out_dtype).itemsize)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k_dim, n_dim), out_dtype),
        grid=(pl.cdiv(n_dim, block_n), pl.cdiv(k_dim, block_k), num_groups),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0,
                                      bytes_accessed=bytes_accessed),
        interpret=interpret,
        name="tgmm",
    )(offsets, lhs, rhs)
