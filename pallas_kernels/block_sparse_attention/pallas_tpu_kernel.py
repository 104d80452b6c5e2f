"""Pallas TPU (Mosaic) block-sparse attention: forward, dQ and dK/dV kernels.

The block plan is scalar-prefetched into SMEM and drives the BlockSpec index maps, so the
pipeline DMAs only active key blocks: grid step (b, h, i, j) computes query block i against the
j-th entry of its compacted list. Entries past a row's count repeat the last block (no new DMA)
and skip compute; FULL entries (the first `num_full`) skip the element mask. Arrays are
head-major ([B, H, S, D]) so tiles are (rows, head dim); positions and segment ids come as
columns [B, S, 1] for queries and rows [B, 1, T] for keys, so the mask broadcasts without a
transpose. Statistics and accumulators live in float32 VMEM scratch across the j axis.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse_attention import sparsity

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Config:
    """Kernel knobs. On hardware, blocks are multiples of 128 (lane width) or the whole padded
    sequence; `interpret` runs the kernels in Pallas' TPU interpreter on CPU."""

    block_q: int = 512
    block_k: int = 512
    block_q_bwd: int = 256
    block_k_bwd: int = 256
    interpret: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"Config.{name}={value!r} must be a positive power of two")


def _dot(a, b, dims):
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _mask(problem, masked, q_pos, kv_pos, q_seg, kv_seg):
    """Element mask [bq, bk] for a PARTIAL block, the segment mask for a FULL one, or None."""
    if masked:
        mask = sparsity._kernel_layout(problem.layout)._allowed(q_pos, kv_pos, jnp) & (kv_pos >= 0)
        return mask if q_seg is None else mask & (q_seg == kv_seg)
    return None if q_seg is None else q_seg == kv_seg


# Index arithmetic on program ids uses lax.div / lax.rem (non-negative operands): jnp's `//`
# and `%` add sign fix-ups that Mosaic only lowers with a TPU attached.


def _interpret(config: Config):
    return pltpu.InterpretParams() if config.interpret else False


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# ---- forward ----

def _forward_kernel(blocks_ref, num_full_ref, num_ref, q_ref, k_ref, v_ref, q_pos_ref,
                    kv_pos_ref, *refs, problem, has_seg, width):
    if has_seg:
        q_seg_ref, kv_seg_ref, out_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        out_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def update(masked):
        s = _dot(q_ref[...], k_ref[...], _NT) * problem.scale
        mask = _mask(problem, masked, q_pos_ref[...], kv_pos_ref[...],
                     q_seg_ref[...] if has_seg else None, kv_seg_ref[...] if has_seg else None)
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing visible yet: exact zeros
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v_ref.dtype), v_ref[...], _NN)
        m_sc[...] = m_new

    num_full, num = num_full_ref[i], num_ref[i]
    pl.when(j < num_full)(lambda: update(False))
    pl.when((j >= num_full) & (j < num))(lambda: update(True))

    @pl.when(j == width - 1)
    def _finish():
        l = l_sc[...]
        nonempty = l > 0
        l_safe = jnp.where(nonempty, l, 1.0)
        out_ref[...] = (acc_sc[...] / l_safe).astype(out_ref.dtype)
        lse_ref[...] = jnp.where(nonempty, m_sc[...] + jnp.log(l_safe), -jnp.inf)


def _side_specs(block_q, block_k, q_index, kv_index, has_seg):
    """Specs of positions (and segment ids): query columns [B,S,1], key rows [B,1,T]."""
    specs = [pl.BlockSpec((None, block_q, 1), q_index), pl.BlockSpec((None, 1, block_k), kv_index)]
    return specs * 2 if has_seg else specs


def _side_args(q_pos, kv_pos, q_seg, kv_seg):
    args = [q_pos[:, :, None], kv_pos[:, None, :]]
    if q_seg is not None:
        args += [q_seg[:, :, None], kv_seg[:, None, :]]
    return args


def forward(problem: sparsity.Problem, q, k, v, q_pos, kv_pos, q_seg, kv_seg, *,
            config: Config):
    """Padded head-major inputs q [B,H,S,Dk], k [B,G,T,Dk], v [B,G,T,Dv] ->
    (out [B,H,S,Dv], lse [B,H,S,1] float32)."""
    batch, num_heads, s_len, d_k = q.shape
    num_groups, d_v = k.shape[1], v.shape[3]
    rep = num_heads // num_groups
    plan = problem.plan
    width, bq, bk = plan.by_q.width, problem.block_q, problem.block_k
    has_seg = q_seg is not None
    prefetch = (jnp.asarray(plan.by_q.blocks.reshape(-1)), jnp.asarray(plan.by_q.num_full),
                jnp.asarray(plan.by_q.num))

    def kv_block(b, h, i, j, blocks, *_):
        return blocks[i * width + j]

    in_specs = [
        pl.BlockSpec((None, None, bq, d_k), lambda b, h, i, j, *_: (b, h, i, 0)),
        pl.BlockSpec((None, None, bk, d_k),
                     lambda b, h, i, j, *p: (b, lax.div(h, rep), kv_block(b, h, i, j, *p), 0)),
        pl.BlockSpec((None, None, bk, d_v),
                     lambda b, h, i, j, *p: (b, lax.div(h, rep), kv_block(b, h, i, j, *p), 0)),
    ] + _side_specs(bq, bk, lambda b, h, i, j, *_: (b, i, 0),
                    lambda b, h, i, j, *p: (b, 0, kv_block(b, h, i, j, *p)), has_seg)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(batch, num_heads, plan.num_q_blocks, width),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, d_v), lambda b, h, i, j, *_: (b, h, i, 0)),
                   pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, *_: (b, h, i, 0))],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, d_v), jnp.float32)],
    )
    kernel = functools.partial(_forward_kernel, problem=problem, has_seg=has_seg, width=width)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((batch, num_heads, s_len, d_v), q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, s_len, 1), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=_interpret(config), name="block_sparse_attention_fwd_tpu",
    )(*prefetch, q, k, v, *_side_args(q_pos, kv_pos, q_seg, kv_seg))


# ---- backward ----

def _dq_kernel(blocks_ref, num_full_ref, num_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, q_pos_ref, kv_pos_ref, *refs, problem, has_seg, width):
    if has_seg:
        q_seg_ref, kv_seg_ref, dq_ref, dq_sc = refs
    else:
        dq_ref, dq_sc = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def update(masked):
        k = k_ref[...]
        s = _dot(q_ref[...], k, _NT) * problem.scale
        mask = _mask(problem, masked, q_pos_ref[...], kv_pos_ref[...],
                     q_seg_ref[...] if has_seg else None, kv_seg_ref[...] if has_seg else None)
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        lse = lse_ref[...]
        p = jnp.exp(s - jnp.where(lse == -jnp.inf, jnp.inf, lse))  # empty rows: p = 0
        dp = _dot(do_ref[...], v_ref[...], _NT)
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += _dot(ds.astype(k.dtype), k, _NN)

    num_full, num = num_full_ref[i], num_ref[i]
    pl.when(j < num_full)(lambda: update(False))
    pl.when((j >= num_full) & (j < num))(lambda: update(True))

    @pl.when(j == width - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * problem.scale).astype(dq_ref.dtype)


def _dkv_kernel(blocks_ref, num_full_ref, num_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, q_pos_ref, kv_pos_ref, *refs, problem, has_seg, width, rep):
    if has_seg:
        q_seg_ref, kv_seg_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    else:
        dk_ref, dv_ref, dk_sc, dv_sc = refs
    kb, step = pl.program_id(2), pl.program_id(3)
    j = lax.rem(step, width)  # steps run over (query head of the group, active query block)

    @pl.when(step == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def update(masked):
        q, d_out = q_ref[...], do_ref[...]
        s = _dot(q, k_ref[...], _NT) * problem.scale
        mask = _mask(problem, masked, q_pos_ref[...], kv_pos_ref[...],
                     q_seg_ref[...] if has_seg else None, kv_seg_ref[...] if has_seg else None)
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        lse = lse_ref[...]
        p = jnp.exp(s - jnp.where(lse == -jnp.inf, jnp.inf, lse))
        dv_sc[...] += _dot(p.astype(d_out.dtype), d_out, _TN)
        dp = _dot(d_out, v_ref[...], _NT)
        ds = p * (dp - delta_ref[...])
        dk_sc[...] += _dot(ds.astype(q.dtype), q, _TN)

    num_full, num = num_full_ref[kb], num_ref[kb]
    pl.when(j < num_full)(lambda: update(False))
    pl.when((j >= num_full) & (j < num))(lambda: update(True))

    @pl.when(step == rep * width - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * problem.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(problem: sparsity.Problem, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, d_out,
             delta, *, config: Config):
    """Head-major padded inputs; lse and delta [B,H,S,1] float32 -> (dq, dk, dv)."""
    del out  # enters through delta
    batch, num_heads, s_len, d_k = q.shape
    num_groups, d_v = k.shape[1], v.shape[3]
    rep = num_heads // num_groups
    plan = problem.plan_bwd
    bq, bk = problem.block_q_bwd, problem.block_k_bwd
    has_seg = q_seg is not None
    d_out = d_out.astype(q.dtype)
    sides = _side_args(q_pos, kv_pos, q_seg, kv_seg)
    interpret = _interpret(config)

    # dQ: grid (b, h, query block, active key block).
    width = plan.by_q.width
    kv_block = lambda i, j, blocks: blocks[i * width + j]
    q_tile = lambda b, h, i, j, *_: (b, h, i, 0)
    kv_tile = lambda b, h, i, j, blocks, *_: (b, lax.div(h, rep), kv_block(i, j, blocks), 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(batch, num_heads, plan.num_q_blocks, width),
        in_specs=[
            pl.BlockSpec((None, None, bq, d_k), q_tile),
            pl.BlockSpec((None, None, bk, d_k), kv_tile),
            pl.BlockSpec((None, None, bk, d_v), kv_tile),
            pl.BlockSpec((None, None, bq, d_v), q_tile),
            pl.BlockSpec((None, None, bq, 1), q_tile),
            pl.BlockSpec((None, None, bq, 1), q_tile),
        ] + _side_specs(bq, bk, lambda b, h, i, j, *_: (b, i, 0),
                        lambda b, h, i, j, blocks, *_: (b, 0, kv_block(i, j, blocks)), has_seg),
        out_specs=pl.BlockSpec((None, None, bq, d_k), q_tile),
        scratch_shapes=[pltpu.VMEM((bq, d_k), jnp.float32)],
    )
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, problem=problem, has_seg=has_seg, width=width),
        grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret, name="block_sparse_attention_dq_tpu",
    )(jnp.asarray(plan.by_q.blocks.reshape(-1)), jnp.asarray(plan.by_q.num_full),
      jnp.asarray(plan.by_q.num), q, k, v, d_out, lse, delta, *sides)

    # dK/dV: grid (b, kv head, key block, (query head in group, active query block)).
    width = plan.by_kv.width
    q_block = lambda kb, step, blocks: blocks[kb * width + lax.rem(step, width)]
    head = lambda g, step: g * rep + lax.div(step, width)
    q_tile = lambda b, g, kb, step, blocks, *_: (b, head(g, step), q_block(kb, step, blocks), 0)
    kv_tile = lambda b, g, kb, step, *_: (b, g, kb, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(batch, num_groups, plan.num_kv_blocks, rep * width),
        in_specs=[
            pl.BlockSpec((None, None, bq, d_k), q_tile),
            pl.BlockSpec((None, None, bk, d_k), kv_tile),
            pl.BlockSpec((None, None, bk, d_v), kv_tile),
            pl.BlockSpec((None, None, bq, d_v), q_tile),
            pl.BlockSpec((None, None, bq, 1), q_tile),
            pl.BlockSpec((None, None, bq, 1), q_tile),
        ] + _side_specs(bq, bk,
                        lambda b, g, kb, step, blocks, *_: (b, q_block(kb, step, blocks), 0),
                        lambda b, g, kb, step, *_: (b, 0, kb), has_seg),
        out_specs=[pl.BlockSpec((None, None, bk, d_k), kv_tile),
                   pl.BlockSpec((None, None, bk, d_v), kv_tile)],
        scratch_shapes=[pltpu.VMEM((bk, d_k), jnp.float32), pltpu.VMEM((bk, d_v), jnp.float32)],
    )
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, problem=problem, has_seg=has_seg, width=width, rep=rep),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret, name="block_sparse_attention_dkv_tpu",
    )(jnp.asarray(plan.by_kv.blocks.reshape(-1)), jnp.asarray(plan.by_kv.num_full),
      jnp.asarray(plan.by_kv.num), q, k, v, d_out, lse, delta, *sides)
    return dq, dk, dv
