"""Pallas GPU (Triton lowering) kernel for quant_matmul and quant_gmm: one body for every mode.

Grid (n tiles, row tiles, K splits). Row tile i is (expert, start, end) from a table: a dense
matmul has one expert owning all rows (common.dense_row_tiles); the grouped variant uses
grouped_matmul.metadata.row_tiles, whose tiles never span two experts, and expert == E marks the
tail rows (past sum(group_sizes)), stored as zeros. Each program loops over its split's K blocks:

  per-channel   acc += dot(x_blk, w_blk)                       (int32 for A8, float32 for A16)
  groups        part = sum of the group's block dots; then
                  Integer Scale:  acc_i32 += (part >> 4 if int4) * s_int[g]   (all int32)
                  float scales:   acc_f32 += float(part) * s[g]               (the baseline)

and ends with common.epilogue (split_k == 1) or stores the raw accumulator of its split
(split_k > 1; common.finish sums and scales). int4 weights: see common.py (SINT4toS8 in A8; the
x operand arrives as its even and odd columns).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.quant_matmul import common
from pallas_kernels.quant_matmul.reference import Mode


def _kernel(tiles_ref, *refs, mode: Mode, alpha, plan: common.KPlan, num_x: int, block_m: int,
            block_n: int, num_experts: int, partial: bool):
    x_refs, w_ref, ws_ref = refs[:num_x], refs[num_x], refs[num_x + 1]
    xs_ref = refs[num_x + 2] if mode.a8 else None
    out_ref = refs[-1]
    n_i, tile, s_i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    expert, start, end = tiles_ref[0, tile], tiles_ref[1, tile], tiles_ref[2, tile]
    num_rows, n_dim = x_refs[0].shape[0], w_ref.shape[2]
    rows, cols = start + jnp.arange(block_m), n_i * block_n + jnp.arange(block_n)
    row_span, col_span = pl.ds(start, block_m), pl.ds(n_i * block_n, block_n)
    row_ok, col_ok = rows < num_rows, cols < n_dim
    out_at = out_ref.at[s_i, row_span, col_span] if partial else out_ref.at[row_span, col_span]
    store_mask = (rows < end)[:, None] & col_ok[None, :]
    x_dtype = x_refs[0].dtype
    dot_type = jnp.int32 if mode.a8 else jnp.float32
    precision = jax.lax.Precision.HIGHEST if x_dtype == jnp.float32 else None
    bkp = plan.block_kp

    def dot(a, b):
        return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                                   preferred_element_type=dot_type)

    def block_dot(b):
        ks = b * bkp + jnp.arange(bkp)
        k_span, k_ok = pl.ds(b * bkp, bkp), ks < plan.kp_dim
        p = plgpu.load(w_ref.at[expert, k_span, col_span], mask=k_ok[:, None] & col_ok[None, :],
                       other=0)
        xt = [plgpu.load(r.at[row_span, k_span], mask=row_ok[:, None] & k_ok[None, :], other=0)
              for r in x_refs]
        if mode.bits == 8:
            return dot(xt[0], p if mode.a8 else p.astype(x_dtype))
        lo, hi = common.unpack_tile(p, a8=mode.a8, dtype=x_dtype)
        return dot(xt[0], lo) + dot(xt[1], hi)

    acc_dtype = common.acc_dtype(mode)
    first = s_i * plan.blocks_per_split
    zeros = functools.partial(jnp.zeros, (block_m, block_n))

    def group_body(gi, acc):
        b0 = first + gi * plan.blocks_per_group
        part = jax.lax.fori_loop(0, plan.blocks_per_group, lambda j, p: p + block_dot(b0 + j),
                                 zeros(dot_type))
        if mode.group_size is None:
            return acc + part
        scale = plgpu.load(ws_ref.at[expert, b0 // plan.blocks_per_group, col_span], mask=col_ok,
                           other=0)[None, :]
        if mode.integer_scale:
            if mode.bits == 4:
                part = jnp.right_shift(part, 4)  # 16·part -> part, exact (SINT4toS8)
            return acc + part * scale
        return acc + part.astype(jnp.float32) * scale

    @pl.when((start < end) & (expert < num_experts))
    def _matmul():
        acc = jax.lax.fori_loop(0, plan.groups_per_split, group_body, zeros(acc_dtype))
        if partial:
            plgpu.store(out_at, acc, mask=store_mask)
            return
        xs = (plgpu.load(xs_ref.at[row_span], mask=row_ok, other=0)[:, None] if mode.a8
              else None)
        ws = (plgpu.load(ws_ref.at[expert, col_span], mask=col_ok, other=0)[None, :]
              if mode.group_size is None else None)
        y = common.epilogue(acc, xs, ws, mode=mode, alpha=alpha)
        plgpu.store(out_at, y.astype(out_ref.dtype), mask=store_mask)

    @pl.when((start < end) & (expert == num_experts))
    def _tail_rows_are_zero():
        plgpu.store(out_at, zeros(out_ref.dtype), mask=store_mask)


def quant_matmul(tiles, x, w, w_scale, x_scale, *, mode: Mode, alpha, out_dtype, plan,
                 block_m: int, block_n: int, num_warps: int, num_stages: int, interpret: bool):
    """x [M, K], w [E, Kp, N], w_scale [E, N] or [E, G, N], x_scale [M] or None, row tiles
    [3, tiles] -> [M, N] out_dtype, or [split_k, M, N] accumulators when plan.split_k > 1."""
    num_rows, k_dim = x.shape
    num_experts, _, n_dim = w.shape
    x_parts = common.as_tuple_x(x, mode)
    partial = plan.split_k > 1
    out_shape = ((plan.split_k, num_rows, n_dim), common.acc_dtype(mode)) if partial else (
        (num_rows, n_dim), out_dtype)
    kernel = functools.partial(_kernel, mode=mode, alpha=alpha, plan=plan, num_x=len(x_parts),
                               block_m=block_m, block_n=block_n, num_experts=num_experts,
                               partial=partial)
    operands = (*x_parts, w, w_scale) + ((x_scale,) if mode.a8 else ())
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(*out_shape),
        grid=(pl.cdiv(n_dim, block_n), tiles.shape[1], plan.split_k),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=pl.CostEstimate(**common.cost(num_rows, k_dim, n_dim, mode, num_experts,
                                                    x.dtype.itemsize)),
        interpret=interpret,
        name=f"quant_matmul_{mode.name}",
    )(tiles, *operands)
