"""Pallas TPU (Mosaic) kernel for quant_matmul and quant_gmm, every mode, MegaBlocks style.

Grid (n tiles, visits, k steps). A visit is (expert, bm-aligned row tile), scalar-prefetched into
SMEM: grouped_matmul.metadata.tile_visits for quant_gmm (a row tile straddling experts is visited
once per expert, back to back, each storing its own rows; the tail rows get a visit that stores
zeros); a dense matmul visits every row tile once as expert 0. Each k step holds whole groups:

  per-channel   acc += dot(x_blk, w_blk)                  (int32 for A8, float32 for A16)
  groups        for each group j of the step (static):  part = dot(x_blk[:, j], w_blk[j]);
                  Integer Scale:  acc_i32 += (part >> 4 if int4) * s_int[g]
                  float scales:   acc_f32 += float(part) * s[g]

The accumulator lives in VMEM scratch across k steps; the last step applies common.epilogue and
stores the visit's rows into the resident output block (a masked select). w_scale for a group
mode is one resident [G, bn] block per n tile, read a row per group. int4: see common.py (the
unpack runs in int32 lanes here).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quant_matmul import common
from pallas_kernels.quant_matmul.reference import Mode


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _kernel(group_ids, m_tile_ids, offsets, *refs, mode: Mode, alpha, num_x: int, block_m: int,
            block_kp: int, kp_dim: int, num_experts: int):
    x_refs, w_ref, ws_ref = refs[:num_x], refs[num_x], refs[num_x + 1]
    xs_ref = refs[num_x + 2] if mode.a8 else None
    out_ref, acc_ref = refs[-2], refs[-1]
    visit, k_i = pl.program_id(1), pl.program_id(2)
    expert = group_ids[visit]
    x_dtype = x_refs[0].dtype
    dot_type = jnp.int32 if mode.a8 else jnp.float32
    precision = jax.lax.Precision.HIGHEST if x_dtype == jnp.float32 else None

    def dot(a, b):
        return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                                   preferred_element_type=dot_type)

    @pl.when(k_i == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(expert < num_experts)  # the tail visit keeps a zero accumulator
    def _accumulate():
        xt = [r[...] for r in x_refs]
        if kp_dim % block_kp:  # the last step's padding columns are undefined (maybe NaN)
            k = jax.lax.broadcasted_iota(jnp.int32, xt[0].shape, 1) + k_i * block_kp
            xt = [jnp.where(k < kp_dim, t, jnp.zeros_like(t)) for t in xt]
        p = w_ref[...]
        if mode.bits == 4:
            w_parts = common.unpack_tile(p, a8=mode.a8, dtype=x_dtype, wide=True)
        else:
            w_parts = (p if mode.a8 else p.astype(x_dtype),)

        def span_dot(lo: int, hi: int):
            return sum(dot(t[:, lo:hi], w[lo:hi]) for t, w in zip(xt, w_parts))

        if mode.group_size is None:
            acc_ref[...] += span_dot(0, block_kp)
            return
        gp = mode.group_size * mode.bits // 8  # packed rows per group
        groups_per_step = block_kp // gp
        for j in range(groups_per_step):
            part = span_dot(j * gp, (j + 1) * gp)
            scale = ws_ref[pl.ds(k_i * groups_per_step + j, 1), :]  # [1, bn]
            if mode.integer_scale:
                if mode.bits == 4:
                    part = jnp.right_shift(part, 4)  # 16·part -> part, exact (SINT4toS8)
                acc_ref[...] += part * scale
            else:
                acc_ref[...] += part.astype(jnp.float32) * scale

    @pl.when(k_i == pl.num_programs(2) - 1)
    def _store():
        xs = xs_ref[...] if mode.a8 else None  # [bm, 1]
        ws = ws_ref[...] if mode.group_size is None else None  # [1, bn]
        y = common.epilogue(acc_ref[...], xs, ws, mode=mode, alpha=alpha)
        y = jnp.where(expert < num_experts, y, 0.0)
        rows = m_tile_ids[visit] * block_m + jax.lax.broadcasted_iota(jnp.int32, y.shape, 0)
        mine = (rows >= offsets[expert]) & (rows < offsets[expert + 1])
        # Other rows keep what an earlier visit of this block stored (or will get a later one).
        out_ref[...] = jnp.where(mine, y.astype(out_ref.dtype), out_ref[...])


def quant_matmul(visits, x, w, w_scale, x_scale, *, mode: Mode, alpha, out_dtype,
                 block_m: int, block_k: int, block_n: int, interpret):
    """visits (group_ids, m_tile_ids, offsets [E+2], num_visits), x [M, K], w [E, Kp, N],
    w_scale [E, 1, N] or [E, G, N], x_scale [M] or None -> [M, N] out_dtype."""
    group_ids, m_tile_ids, offsets, num_visits = visits
    num_rows, k_dim = x.shape
    num_experts, kp_dim, n_dim = w.shape
    block_kp = block_k * mode.bits // 8
    x_parts = common.as_tuple_x(x, mode)
    last = num_experts - 1

    def x_map(n_i, v, k_i, group_ids, m_tile_ids, offsets):
        return m_tile_ids[v], k_i

    def w_map(n_i, v, k_i, group_ids, m_tile_ids, offsets):
        return jnp.minimum(group_ids[v], last), k_i, n_i  # the tail visit reads (ignores) E-1

    def ws_map(n_i, v, k_i, group_ids, m_tile_ids, offsets):
        return jnp.minimum(group_ids[v], last), 0, n_i

    def xs_map(n_i, v, k_i, group_ids, m_tile_ids, offsets):
        return m_tile_ids[v], 0

    def out_map(n_i, v, k_i, group_ids, m_tile_ids, offsets):
        return m_tile_ids[v], n_i

    in_specs = [pl.BlockSpec((block_m, block_kp), x_map) for _ in x_parts]
    in_specs += [pl.BlockSpec((pl.squeezed, block_kp, block_n), w_map),
                 pl.BlockSpec((pl.squeezed, w_scale.shape[1], block_n), ws_map)]
    operands = (*x_parts, w, w_scale)
    if mode.a8:
        in_specs.append(pl.BlockSpec((block_m, 1), xs_map))
        operands += (x_scale[:, None],)
    kernel = functools.partial(_kernel, mode=mode, alpha=alpha, num_x=len(x_parts),
                               block_m=block_m, block_kp=block_kp, kp_dim=kp_dim,
                               num_experts=num_experts)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(_cdiv(n_dim, block_n), num_visits, _cdiv(kp_dim, block_kp)),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, block_n), out_map),
        scratch_shapes=[pltpu.VMEM((block_m, block_n), common.acc_dtype(mode))],
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, n_dim), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL, pltpu.ARBITRARY, pltpu.ARBITRARY)),
        cost_estimate=pl.CostEstimate(**common.cost(num_rows, k_dim, n_dim, mode, num_experts,
                                                    x.dtype.itemsize)),
        interpret=interpret,
        name=f"quant_matmul_{mode.name}",
    )(group_ids, m_tile_ids, offsets, *operands)


def dense_visits(num_rows: int, block_m: int):
    """tile_visits of a dense matmul: every row tile once, as expert 0 owning rows [0, M)."""
    num_tiles = _cdiv(num_rows, block_m)
    return (jnp.zeros((num_tiles,), jnp.int32), jnp.arange(num_tiles, dtype=jnp.int32),
            jnp.array([0, num_rows, num_rows], jnp.int32), num_tiles)
