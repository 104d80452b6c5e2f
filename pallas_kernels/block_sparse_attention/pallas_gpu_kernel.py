"""Pallas GPU (Triton lowering) block-sparse attention: forward kernel.

One program per (query block, batch, query head). It loads its query tile once and walks the key
blocks of its row of the `BlockPlan`: first the FULL blocks without any element mask, then the
PARTIAL ones with the mask (layout on positions, empty slots, segments). Online softmax in base 2
(the scale is folded with log2(e), so one exp2 per score); statistics in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse_attention import sparsity

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Config:
    """Kernel knobs. Blocks are powers of two >= 16 on hardware (tl.dot); interpret runs the same
    kernels on CPU through Pallas' interpreter."""

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 8
    num_stages: int = 2
    num_warps_bwd: int = 8
    num_stages_bwd: int = 2
    interpret: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"Config.{name}={value!r} must be a positive power of two")
        for name in ("num_warps", "num_stages", "num_warps_bwd", "num_stages_bwd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Config.{name}={getattr(self, name)!r} must be an int >= 1")


def dot(a, b, dims, dtype):
    """float32-accumulated tile matmul; float32 inputs stay IEEE (Triton would use tf32)."""
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def online_softmax_step(s, m_prev, l_prev, acc_prev, v, dtype):
    """One FlashAttention update with base-2 logits `s` [bq, bk] (-inf where masked).

    Rows whose running max is still -inf (nothing visible yet) use 0 as the shift, so exp2 gives
    exact zeros rather than NaN, and a fully masked row ends with l = 0.
    """
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m_prev - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    acc = acc_prev * alpha[:, None] + dot(p.astype(v.dtype), v, _NN, dtype)
    return m_new, l_new, acc


def _forward_kernel(q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, *refs, problem, has_seg):
    if has_seg:
        q_seg_ref, kv_seg_ref, plan_ref, out_ref, lse_ref = refs
        q_seg = q_seg_ref[...]
    else:
        plan_ref, out_ref, lse_ref = refs
        q_seg = None
    block_q, block_k = problem.block_q, problem.block_k
    dtype = q_ref.dtype
    q = q_ref[...]
    q_pos = q_pos_ref[...]
    qk_scale = problem.scale * sparsity.LOG2_E

    def step(j, carry, masked):
        m, l, acc = carry
        start = pl.multiple_of(plan_ref[2 + j] * block_k, block_k)
        keys = pl.ds(start, block_k)
        s = dot(q, k_ref[keys, :], _NT, dtype) * qk_scale
        if masked:
            kv_seg = kv_seg_ref[keys] if has_seg else None
            s = jnp.where(sparsity.element_mask(problem.layout, q_pos, kv_pos_ref[keys], q_seg,
                                                kv_seg), s, -jnp.inf)
        elif has_seg:
            s = jnp.where(sparsity.segment_mask(q_seg, kv_seg_ref[keys]), s, -jnp.inf)
        return online_softmax_step(s, m, l, acc, v_ref[keys, :], dtype)

    carry = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
             jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32))
    num_full, num = plan_ref[0], plan_ref[1]
    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    m, l, acc = lax.fori_loop(num_full, num, functools.partial(step, masked=True), carry)
    nonempty = l > 0
    l_safe = jnp.where(nonempty, l, 1.0)
    out_ref[...] = (acc / l_safe[:, None]).astype(out_ref.dtype)
    # Natural-log lse for callers; -inf marks rows that saw no key.
    lse_ref[...] = jnp.where(nonempty, (m + jnp.log2(l_safe)) * sparsity.LN_2, -jnp.inf)


def forward(problem: sparsity.Problem, q, k, v, q_pos, kv_pos, q_seg, kv_seg, *,
            config: Config):
    """Padded inputs -> (out [B,S,H,Dv] in q.dtype, lse [B,H,S] float32)."""
    batch, s_len, num_heads, d_k = q.shape
    t_len, num_groups, d_v = k.shape[1], k.shape[2], v.shape[3]
    rep = num_heads // num_groups
    plan = problem.plan
    packed = jnp.asarray(plan.by_q.packed(sparsity.next_pow2(plan.by_q.width + 2) - 2))
    block_q = problem.block_q
    has_seg = q_seg is not None

    in_specs = [
        pl.BlockSpec((None, block_q, None, d_k), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, t_len, None, d_k), lambda i, b, h: (b, 0, lax.div(h, rep), 0)),
        pl.BlockSpec((None, t_len, None, d_v), lambda i, b, h: (b, 0, lax.div(h, rep), 0)),
        pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
        pl.BlockSpec((None, t_len), lambda i, b, h: (b, 0)),
    ]
    args = [q, k, v, q_pos, kv_pos]
    if has_seg:
        in_specs += [pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
                     pl.BlockSpec((None, t_len), lambda i, b, h: (b, 0))]
        args += [q_seg, kv_seg]
    in_specs.append(pl.BlockSpec((None, packed.shape[1]), lambda i, b, h: (i, 0)))
    args.append(packed)

    kernel = functools.partial(_forward_kernel, problem=problem, has_seg=has_seg)
    return pl.pallas_call(
        kernel,
        grid=(plan.num_q_blocks, batch, num_heads),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, block_q, None, d_v), lambda i, b, h: (b, i, h, 0)),
                   pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct((batch, s_len, num_heads, d_v), q.dtype),
                   jax.ShapeDtypeStruct((batch, num_heads, s_len), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=config.interpret,
        name="block_sparse_attention_fwd",
    )(*args)
