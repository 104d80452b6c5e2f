"""Pallas GPU (Triton lowering) paged decode attention, split-K ("flash decoding").

One program per (sequence, kv head, split). Its rows are all S x H/G queries sharing the kv head
(MQA / absorbed MLA: 1 x 128 heads = one 128-row tile), so every page is read once per kv head
and feeds a tensor-core matmul. The program walks its share of the sequence's visit list (LoZA:
sink and local pages only), gathers each page through the block table, and writes unnormalised
partials (acc, max, sum) that a small jnp epilogue merges across splits.

Head dims that are not powers of two are split into power-of-two chunks (576 = 512 + 64), each a
separate dot, instead of padding the cache; `v_pages=None` takes values from the key chunk(s).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse_attention import decode, sparsity
from pallas_kernels.block_sparse_attention.pallas_gpu_kernel import _NN, _NT, dot

NAME = "pallas_gpu"
_MIN_ROWS = 16  # tl.dot's smallest tile edge


@dataclasses.dataclass(frozen=True)
class Config:
    """`pages_per_split`: visit-list entries per program (split-K when the list is long)."""

    pages_per_split: int = 16
    num_warps: int = 4
    num_stages: int = 2
    interpret: bool = False

    def __post_init__(self):
        for name in ("pages_per_split", "num_warps", "num_stages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Config.{name}={getattr(self, name)!r} must be an int >= 1")


def pow2_chunks(d: int) -> tuple[tuple[int, int], ...]:
    """(offset, size) power-of-two pieces of [0, d), largest first: 576 -> (0,512), (512,64)."""
    chunks, offset = [], 0
    for bit in reversed(range(d.bit_length())):
        if d & (1 << bit):
            chunks.append((offset, 1 << bit))
            offset += 1 << bit
    return tuple(chunks)


def _kernel(q_ref, k_ref, v_ref, tables_ref, visit_ref, q_pos_ref, acc_ref, m_ref, l_ref, *,
            layout, qk_scale, page, d_k, d_v, shared_v, steps):
    split = pl.program_id(2)
    g = pl.program_id(1)
    dtype = q_ref.dtype
    k_chunks, v_chunks = pow2_chunks(d_k), pow2_chunks(d_v)
    q_parts = [q_ref[:, pl.ds(off, n)] for off, n in k_chunks]
    q_pos = q_pos_ref[...]
    count, length = visit_ref[0], visit_ref[1]

    def step(t, carry):
        m, l, acc = carry
        logical = visit_ref[2 + t]
        phys = tables_ref[logical]
        s = sum(dot(qp, k_ref[phys, :, g, pl.ds(off, n)], _NT, dtype)
                for qp, (off, n) in zip(q_parts, k_chunks)) * qk_scale  # [rows, page]
        k_pos = logical * page + lax.broadcasted_iota(jnp.int32, (page,), 0)
        k_pos = jnp.where(k_pos < length, k_pos, -1)
        s = jnp.where(sparsity.element_mask(layout, q_pos, k_pos), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        src = k_ref if shared_v else v_ref
        pv = jnp.concatenate([dot(p.astype(dtype), src[phys, :, g, pl.ds(off, n)], _NN, dtype)
                              for off, n in v_chunks], axis=1) if len(v_chunks) > 1 else dot(
            p.astype(dtype), src[phys, :, g, pl.ds(0, d_v)], _NN, dtype)
        return m_new, alpha * l + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

    rows = q_ref.shape[0]
    carry = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows, d_v), jnp.float32))
    lo = split * steps
    m, l, acc = lax.fori_loop(lo, jnp.minimum(count, lo + steps), step, carry)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, layout, scale,
                           v_head_dim, config: Config | None = None, interpret: bool = False):
    """See `decode.paged_decode_attention`."""
    if not interpret and jax.default_backend() != "gpu":
        raise NotImplementedError(f"{NAME}: platform={jax.default_backend()!r} is not supported; "
                                  "supported: ('gpu',), or interpret=True")
    config = config or Config(interpret=interpret)
    if interpret and not config.interpret:
        config = dataclasses.replace(config, interpret=True)
    batch, s_len, num_heads, d_k = q.shape
    _, page, num_groups, _ = k_pages.shape
    if page & (page - 1) or (page < _MIN_ROWS and not config.interpret):
        raise NotImplementedError(f"{NAME}: page size {page} is not supported; supported: powers "
                                  f"of two >= {_MIN_ROWS}")
    sparsity.check_layout(layout, 1, page, False, NAME)
    rep = num_heads // num_groups
    rows = s_len * rep
    rows_pad = max(_MIN_ROWS, sparsity.next_pow2(rows))
    # Rows (token s, head r of the group) of one kv head form one tile.
    q_bgrd = q.reshape(batch, s_len, num_groups, rep, d_k).transpose(0, 2, 1, 3, 4).reshape(
        batch, num_groups, rows, d_k)
    q_bgrd = jnp.pad(q_bgrd, ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0)))
    q_pos = lengths[:, None] - s_len + jnp.arange(s_len, dtype=jnp.int32)[None, :]
    q_pos = jnp.pad(jnp.repeat(q_pos.astype(jnp.int32), rep, axis=1),
                    ((0, 0), (0, rows_pad - rows)))
    pages, count = decode.visit_plan(layout, lengths, s_len, page, block_tables.shape[1])
    width = pages.shape[1]
    steps = min(width, config.pages_per_split)
    splits = math.ceil(width / steps)
    visit = jnp.concatenate([count[:, None], lengths[:, None].astype(jnp.int32), pages], axis=1)
    shared_v = v_pages is None
    v_src = k_pages if shared_v else v_pages
    kernel = functools.partial(_kernel, layout=layout, qk_scale=scale * sparsity.LOG2_E,
                               page=page, d_k=d_k, d_v=v_head_dim, shared_v=shared_v, steps=steps)
    whole = lambda x: pl.BlockSpec(x.shape, lambda b, g, sp: (0,) * x.ndim)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(batch, num_groups, splits),
        in_specs=[pl.BlockSpec((None, None, rows_pad, d_k), lambda b, g, sp: (b, g, 0, 0)),
                  whole(k_pages), whole(v_src),
                  pl.BlockSpec((None, block_tables.shape[1]), lambda b, g, sp: (b, 0)),
                  pl.BlockSpec((None, visit.shape[1]), lambda b, g, sp: (b, 0)),
                  pl.BlockSpec((None, rows_pad), lambda b, g, sp: (b, 0))],
        out_specs=[pl.BlockSpec((None, None, None, rows_pad, v_head_dim),
                                lambda b, g, sp: (b, g, sp, 0, 0)),
                   pl.BlockSpec((None, None, None, rows_pad), lambda b, g, sp: (b, g, sp, 0)),
                   pl.BlockSpec((None, None, None, rows_pad), lambda b, g, sp: (b, g, sp, 0))],
        out_shape=[jax.ShapeDtypeStruct((batch, num_groups, splits, rows_pad, v_head_dim),
                                        jnp.float32),
                   jax.ShapeDtypeStruct((batch, num_groups, splits, rows_pad), jnp.float32),
                   jax.ShapeDtypeStruct((batch, num_groups, splits, rows_pad), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=config.interpret,
        name="paged_decode_attention",
    )(q_bgrd, k_pages, v_src, block_tables.astype(jnp.int32), visit, q_pos)
    # Merge the splits (base-2 statistics); rows that saw no key stay 0.
    m_max = jnp.max(m, axis=2, keepdims=True)
    weight = jnp.exp2(m - jnp.where(m_max == -jnp.inf, 0.0, m_max))
    denom = jnp.sum(l * weight, axis=2)
    out = jnp.sum(acc * weight[..., None], axis=2) / jnp.where(denom > 0, denom, 1.0)[..., None]
    out = out[:, :, :rows].reshape(batch, num_groups, s_len, rep, v_head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, s_len, num_heads, v_head_dim).astype(
        q.dtype)
