"""Pallas GPU (Triton lowering) block-sparse attention: FlashAttention-2 backward kernels.

Two kernels, each visiting only active blocks, recomputing P = exp2(s - lse) from the saved
log-sum-exp and using delta = rowsum(dO * O) - dlse (computed by the caller):

* dQ: one program per (query block, batch, query head) over its row of key blocks.
* dK/dV: one program per (key block, batch, kv head) over the query blocks that see it (the
  transposed plan) and over the H/G query heads sharing the kv head, so no atomics are needed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse_attention import sparsity
from pallas_kernels.block_sparse_attention.pallas_gpu_kernel import _NN, _NT, _TN, Config, dot


def _lse_base2(lse):
    """Natural-log lse -> base 2, with +inf for empty rows so exp2(s - lse2) is exactly 0."""
    return jnp.where(lse == -jnp.inf, jnp.inf, lse * sparsity.LOG2_E)


def _dq_kernel(q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, do_ref, lse_ref, delta_ref, *refs,
               problem, has_seg):
    if has_seg:
        q_seg_ref, kv_seg_ref, plan_ref, dq_ref = refs
        q_seg = q_seg_ref[...]
    else:
        plan_ref, dq_ref = refs
        q_seg = None
    block_k = problem.block_k_bwd
    dtype = q_ref.dtype
    q, d_out, q_pos = q_ref[...], do_ref[...], q_pos_ref[...]
    lse2, delta = _lse_base2(lse_ref[...]), delta_ref[...]
    qk_scale = problem.scale * sparsity.LOG2_E

    def step(j, dq, masked):
        start = pl.multiple_of(plan_ref[2 + j] * block_k, block_k)
        keys = pl.ds(start, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = dot(q, k, _NT, dtype) * qk_scale
        if masked:
            kv_seg = kv_seg_ref[keys] if has_seg else None
            s = jnp.where(sparsity.element_mask(problem.layout, q_pos, kv_pos_ref[keys], q_seg,
                                                kv_seg), s, -jnp.inf)
        elif has_seg:
            s = jnp.where(sparsity.segment_mask(q_seg, kv_seg_ref[keys]), s, -jnp.inf)
        p = jnp.exp2(s - lse2[:, None])
        dp = dot(d_out, v, _NT, dtype)
        ds = p * (dp - delta[:, None])
        return dq + dot(ds.astype(dtype), k, _NN, dtype)

    dq = jnp.zeros(q_ref.shape, jnp.float32)
    num_full, num = plan_ref[0], plan_ref[1]
    dq = lax.fori_loop(0, num_full, functools.partial(step, masked=False), dq)
    dq = lax.fori_loop(num_full, num, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * problem.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, do_ref, lse_ref, delta_ref, *refs,
                problem, has_seg, rep):
    if has_seg:
        q_seg_ref, kv_seg_ref, plan_ref, dk_ref, dv_ref = refs
        kv_seg = kv_seg_ref[...]
    else:
        plan_ref, dk_ref, dv_ref = refs
        kv_seg = None
    block_q = problem.block_q_bwd
    dtype = k_ref.dtype
    k, v, kv_pos = k_ref[...], v_ref[...], kv_pos_ref[...]
    qk_scale = problem.scale * sparsity.LOG2_E
    num_full, num = plan_ref[0], plan_ref[1]

    def step(j, carry, head, masked):
        dk, dv = carry
        start = pl.multiple_of(plan_ref[2 + j] * block_q, block_q)
        rows = pl.ds(start, block_q)
        q, d_out = q_ref[rows, head, :], do_ref[rows, head, :]
        s = dot(q, k, _NT, dtype) * qk_scale  # [bq, bk]
        if masked:
            q_seg = q_seg_ref[rows] if has_seg else None
            s = jnp.where(sparsity.element_mask(problem.layout, q_pos_ref[rows], kv_pos, q_seg,
                                                kv_seg), s, -jnp.inf)
        elif has_seg:
            s = jnp.where(sparsity.segment_mask(q_seg_ref[rows], kv_seg), s, -jnp.inf)
        p = jnp.exp2(s - _lse_base2(lse_ref[head, rows])[:, None])
        dv = dv + dot(p.astype(dtype), d_out, _TN, dtype)
        dp = dot(d_out, v, _NT, dtype)
        ds = p * (dp - delta_ref[head, rows][:, None])
        dk = dk + dot(ds.astype(dtype), q, _TN, dtype)
        return dk, dv

    def head_body(head, carry):
        carry = lax.fori_loop(0, num_full, functools.partial(step, head=head, masked=False),
                              carry)
        return lax.fori_loop(num_full, num, functools.partial(step, head=head, masked=True),
                             carry)

    carry = (jnp.zeros(k_ref.shape, jnp.float32), jnp.zeros(v_ref.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, rep, head_body, carry)
    dk_ref[...] = (dk * problem.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(problem: sparsity.Problem, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, d_out,
             delta, *, config: Config):
    """Padded inputs and cotangents -> (dq, dk, dv) in the input dtypes."""
    del out  # enters through delta
    batch, s_len, num_heads, d_k = q.shape
    t_len, num_groups, d_v = k.shape[1], k.shape[2], v.shape[3]
    rep = num_heads // num_groups
    plan = problem.plan_bwd
    block_q, block_k = problem.block_q_bwd, problem.block_k_bwd
    has_seg = q_seg is not None
    params = plgpu.CompilerParams(num_warps=config.num_warps_bwd,
                                  num_stages=config.num_stages_bwd)
    d_out = d_out.astype(q.dtype)

    # dQ: grid (query block, batch, query head).
    by_q = jnp.asarray(plan.by_q.packed(sparsity.next_pow2(plan.by_q.width + 2) - 2))
    specs = [
        pl.BlockSpec((None, block_q, None, d_k), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, t_len, None, d_k), lambda i, b, h: (b, 0, lax.div(h, rep), 0)),
        pl.BlockSpec((None, t_len, None, d_v), lambda i, b, h: (b, 0, lax.div(h, rep), 0)),
        pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
        pl.BlockSpec((None, t_len), lambda i, b, h: (b, 0)),
        pl.BlockSpec((None, block_q, None, d_v), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
        pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
    ]
    args = [q, k, v, q_pos, kv_pos, d_out, lse, delta]
    if has_seg:
        specs += [pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
                  pl.BlockSpec((None, t_len), lambda i, b, h: (b, 0))]
        args += [q_seg, kv_seg]
    specs.append(pl.BlockSpec((None, by_q.shape[1]), lambda i, b, h: (i, 0)))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, problem=problem, has_seg=has_seg),
        grid=(plan.num_q_blocks, batch, num_heads),
        in_specs=specs,
        out_specs=pl.BlockSpec((None, block_q, None, d_k), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=config.interpret, name="block_sparse_attention_dq",
    )(*args, by_q)

    # dK/dV: grid (key block, batch, kv head); the kernel loops over the group's query heads.
    by_kv = jnp.asarray(plan.by_kv.packed(sparsity.next_pow2(plan.by_kv.width + 2) - 2))
    specs = [
        pl.BlockSpec((None, s_len, rep, d_k), lambda j, b, g: (b, 0, g, 0)),
        pl.BlockSpec((None, block_k, None, d_k), lambda j, b, g: (b, j, g, 0)),
        pl.BlockSpec((None, block_k, None, d_v), lambda j, b, g: (b, j, g, 0)),
        pl.BlockSpec((None, s_len), lambda j, b, g: (b, 0)),
        pl.BlockSpec((None, block_k), lambda j, b, g: (b, j)),
        pl.BlockSpec((None, s_len, rep, d_v), lambda j, b, g: (b, 0, g, 0)),
        pl.BlockSpec((None, rep, s_len), lambda j, b, g: (b, g, 0)),
        pl.BlockSpec((None, rep, s_len), lambda j, b, g: (b, g, 0)),
    ]
    if has_seg:
        specs += [pl.BlockSpec((None, s_len), lambda j, b, g: (b, 0)),
                  pl.BlockSpec((None, block_k), lambda j, b, g: (b, j))]
    specs.append(pl.BlockSpec((None, by_kv.shape[1]), lambda j, b, g: (j, 0)))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, problem=problem, has_seg=has_seg, rep=rep),
        grid=(plan.num_kv_blocks, batch, num_groups),
        in_specs=specs,
        out_specs=[pl.BlockSpec((None, block_k, None, d_k), lambda j, b, g: (b, j, g, 0)),
                   pl.BlockSpec((None, block_k, None, d_v), lambda j, b, g: (b, j, g, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=config.interpret, name="block_sparse_attention_dkv",
    )(*args, by_kv)
    return dq, dk, dv
