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


def _split_k(o_ref, steps, splits: int, block):
    """Program (n, s) sums block(j) = x [T_pad, bk] @ w [bk, bn] (float32) over its span
    [s * per_split, (s + 1) * per_split) of the `steps` row blocks into o_ref."""
    per_split = (steps + splits - 1) // splits
    first = pl.program_id(1) * per_split
    last = jnp.minimum(first + per_split, steps)

    def step(j, acc):
        xa, wb = block(j)
        precision = jax.lax.Precision.HIGHEST if xa.dtype == jnp.float32 else None
        return acc + jnp.dot(xa, wb.astype(xa.dtype), precision=precision,
                             preferred_element_type=jnp.float32)

    o_ref[...] = jax.lax.fori_loop(first, jnp.maximum(first, last), step,
                                   jnp.zeros(o_ref.shape, jnp.float32))


def _kernel(count_ref, idx_ref, x_ref, w_ref, o_ref, *, block_k: int, block_n: int, splits: int):
    cols = pl.program_id(0) * block_n + jax.lax.broadcasted_iota(jnp.int32, (1, block_n), 1)

    def block(j):
        k_span = pl.ds(j * block_k, block_k)
        rows = idx_ref[k_span]  # [bk] active row ids
        return x_ref[:, k_span], plgpu.load(w_ref.at[rows[:, None], cols])  # a gather of rows

    _split_k(o_ref, (count_ref[0] + block_k - 1) // block_k, splits, block)


def _masked_kernel(x_ref, w_ref, o_ref, *, block_k: int, block_n: int, splits: int, steps: int):
    """Row blocks of x and w in place; a block's weight rows load under the mask "some x[:, k]
    != 0", so inactive rows are never fetched from memory (masked lanes issue no transaction)
    and no compaction pass is needed."""
    col = pl.ds(pl.program_id(0) * block_n, block_n)

    def block(j):
        k_span = pl.ds(j * block_k, block_k)
        xa = x_ref[:, k_span]  # [T_pad, bk]
        active = jnp.max(jnp.abs(xa), axis=0) > 0  # [bk]
        mask = jnp.broadcast_to(active[:, None], (block_k, block_n))
        return xa, plgpu.load(w_ref.at[k_span, col], mask=mask, other=0)  # [bk, bn]

    _split_k(o_ref, steps, splits, block)


def _call(kernel, args, t_pad: int, n_dim: int, *, block_n: int, splits: int, num_warps: int,
          num_stages: int, interpret: bool, name: str):
    """Grid (N / block_n, splits) over whole-array inputs; [T_pad, N] float32, the splits'
    partial sums added."""
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, t_pad, n_dim), jnp.float32),
        grid=(n_dim // block_n, splits),
        in_specs=[pl.no_block_spec] * len(args),  # whole arrays: the kernel indexes them itself
        out_specs=pl.BlockSpec((None, t_pad, block_n), lambda n, s: (s, 0, n)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    return partial.sum(0)


def sparse_gemv(count, idx, x_act, w, *, block_k: int, block_n: int, splits: int, num_warps: int,
                num_stages: int, interpret: bool):
    """count [1], idx [K_pad] (active rows first), x_act [T_pad, K_pad] (x at idx, zero past
    count), w [K, N] -> [T_pad, N] float32. block_n divides N; block_k divides K_pad."""
    kernel = functools.partial(_kernel, block_k=block_k, block_n=block_n, splits=splits)
    return _call(kernel, (count, idx, x_act, w), x_act.shape[0], w.shape[1], block_n=block_n,
                 splits=splits, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                 name="sparse_gemv")


def masked_gemv(x, w, *, block_k: int, block_n: int, splits: int, num_warps: int,
                num_stages: int, interpret: bool):
    """x [T_pad, K] (T_pad >= 16), w [K, N] -> [T_pad, N] float32. block_k divides K;
    block_n divides N."""
    kernel = functools.partial(_masked_kernel, block_k=block_k, block_n=block_n, splits=splits,
                               steps=x.shape[1] // block_k)
    return _call(kernel, (x, w), x.shape[0], w.shape[1], block_n=block_n, splits=splits,
                 num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                 name="sparse_gemv_masked")
