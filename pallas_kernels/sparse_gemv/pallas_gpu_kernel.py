"""Pallas Triton kernels: y = x_act @ w[idx] (compacted active rows) or y = x @ w with masked row
loads, each reading only the active rows of w.

Grid (n tiles, splits). Program (n, s) owns a [T_pad, block_n] column tile and the s-th of
`splits` equal spans of the compacted list of active rows (split-K: a decode GEMV has too few
column tiles to fill a GPU, and one program walking all rows is latency-bound). It walks its span
in steps of block_k: loads block_k row indices, gathers those rows of its column span of w (each
row is contiguous in memory, so the gather is coalesced), and accumulates x_act[:, step] @ w_rows
in float32 into its own partial [T_pad, block_n]; the partials are summed outside. Trip counts
come from `count` at run time, so the weight bytes read are count/K of a dense GEMV's (plus the
last step's padding rows, which point at an active row and meet zero activations).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _kernel(count_ref, idx_ref, x_ref, w_ref, o_ref, *, block_k: int, block_n: int, splits: int):
    cols = pl.program_id(0) * block_n + jax.lax.broadcasted_iota(jnp.int32, (1, block_n), 1)
    steps = (count_ref[0] + block_k - 1) // block_k
    per_split = (steps + splits - 1) // splits
    first = pl.program_id(1) * per_split
    last = jnp.minimum(first + per_split, steps)
    precision = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

    def step(j, acc):
        k_span = pl.ds(j * block_k, block_k)
        rows = idx_ref[k_span]  # [bk] active row ids
        xa = x_ref[:, k_span]  # [T_pad, bk]
        wb = plgpu.load(w_ref.at[rows[:, None], cols])  # [bk, bn]: a gather of whole rows
        return acc + jnp.dot(xa, wb.astype(xa.dtype), precision=precision,
                             preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(first, jnp.maximum(first, last), step,
                            jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc


def sparse_gemv(count, idx, x_act, w, *, block_k: int, block_n: int, splits: int, num_warps: int,
                num_stages: int, interpret: bool):
    """count [1], idx [K_pad] (active rows first), x_act [T_pad, K_pad] (x at idx, zero past
    count), w [K, N] -> [T_pad, N] in x_act.dtype. block_n divides N; block_k divides K_pad."""
    t_pad = x_act.shape[0]
    n_dim = w.shape[1]
    kernel = functools.partial(_kernel, block_k=block_k, block_n=block_n, splits=splits)
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, t_pad, n_dim), jnp.float32),
        grid=(n_dim // block_n, splits),
        in_specs=[pl.no_block_spec] * 4,  # whole arrays: the kernel indexes them itself
        out_specs=pl.BlockSpec((None, t_pad, block_n), lambda n, s: (s, 0, n)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sparse_gemv",
    )(count, idx, x_act, w)  # [splits, T_pad, N] float32 partial sums
    return partial.sum(0).astype(x_act.dtype)


def _masked_kernel(x_ref, w_ref, o_ref, *, block_k: int, block_n: int, splits: int, steps: int):
    """Program (n, s): row blocks [s * per_split, (s + 1) * per_split) of x and w in place; a
    block's weight rows load under the mask "some x[:, k] != 0", so inactive rows are never
    fetched from memory (masked lanes issue no transaction) and no compaction pass is needed."""
    col = pl.ds(pl.program_id(0) * block_n, block_n)
    per_split = -(-steps // splits)
    first = pl.program_id(1) * per_split
    last = jnp.minimum(first + per_split, steps)
    precision = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

    def step(j, acc):
        k_span = pl.ds(j * block_k, block_k)
        xa = x_ref[:, k_span]  # [T_pad, bk]
        active = jnp.max(jnp.abs(xa), axis=0) > 0  # [bk]
        mask = jnp.broadcast_to(active[:, None], (block_k, block_n))
        wb = plgpu.load(w_ref.at[k_span, col], mask=mask, other=0)  # [bk, bn]
        return acc + jnp.dot(xa, wb.astype(xa.dtype), precision=precision,
                             preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(first, jnp.maximum(first, last), step,
                            jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc


def masked_gemv(x, w, *, block_k: int, block_n: int, splits: int, num_warps: int,
                num_stages: int, interpret: bool):
    """x [T_pad, K] (T_pad >= 16), w [K, N] -> [T_pad, N] float32 partial sums summed over
    splits. block_k divides K; block_n divides N."""
    t_pad, k_dim = x.shape
    n_dim = w.shape[1]
    kernel = functools.partial(_masked_kernel, block_k=block_k, block_n=block_n, splits=splits,
                               steps=k_dim // block_k)
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, t_pad, n_dim), jnp.float32),
        grid=(n_dim // block_n, splits),
        in_specs=[pl.no_block_spec] * 2,
        out_specs=pl.BlockSpec((None, t_pad, block_n), lambda n, s: (s, 0, n)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sparse_gemv_masked",
    )(x, w)
    return partial.sum(0)
