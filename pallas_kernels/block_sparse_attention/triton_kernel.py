"""Triton kernels for block-sparse attention: forward, dQ and dK/dV (pure `@triton.jit`).

Importable without jax or jax-triton. Arrays are contiguous, padded, row-major:
q [B,S,H,DK], k [B,T,G,DK], v [B,T,G,DV], out [B,S,H,DV], lse/delta [B,H,S] float32,
positions / segment ids [B,S] and [B,T] int32 (key position < 0 = never attended), and a packed
plan [rows, PLAN_W] int32 per outer block: (num_full, num, blocks...) as built by
`sparsity.BlockLists.packed`. Each kernel walks its row of the plan in two passes, FULL blocks
without the element mask, then PARTIAL blocks with it; `tl.static_range(2)` unrolls the passes, so
each kernel is one function.

The layout arrives as constexprs (the And of): CAUSAL (k <= q), WINDOW > 0 (k > q - WINDOW),
LOZA_BLOCK > 0 (k // LOZA_BLOCK < LOZA_SINK or >= q // LOZA_BLOCK - (LOZA_LOCAL - 1)).
Logits are in base 2 (QK_SCALE = scale * log2(e)); lse is stored in natural log.
"""

from __future__ import annotations

import typing

import triton
import triton.language as tl

LN_2: tl.constexpr = 0.6931471805599453
LOG2_E: tl.constexpr = 1.4426950408889634


def interpreted(kernel):
    """`kernel` as Triton's CPU interpreter runs it. Needs TRITON_INTERPRET=1 in the environment
    before triton is first imported: triton.language's own jitted helpers (max, sum, ...) are
    decorated at that import."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise NotImplementedError(
            "interpreting Triton kernels needs TRITON_INTERPRET=1 set before triton is first "
            "imported (e.g. `TRITON_INTERPRET=1 python -m pytest ...`)")
    _fix_interpreter_index()
    return kernel


def _fix_interpreter_index():
    """Triton's interpreter turns a scalar tensor into a loop bound with int() of a 1-element
    1-D array, which numpy >= 2.4 refuses; make it take `.item()` instead (idempotent)."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_lcjax_index_fixed", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._lcjax_index_fixed = True


@triton.jit
@typing.no_type_check  # keep runtime type-check hooks off the kernel body
def attention_fwd(Q, K, V, QPOS, KVPOS, QSEG, KVSEG, PLAN, OUT, LSE,
                  S: tl.constexpr, T: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                  DK: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr,
                  BLOCK_K: tl.constexpr, PLAN_W: tl.constexpr, QK_SCALE: tl.constexpr,
                  HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                  LOZA_BLOCK: tl.constexpr, LOZA_SINK: tl.constexpr, LOZA_LOCAL: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: B*S*H*D may pass 2**31
    h = bh % H
    g = h // (H // G)
    rows = i * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d_k = tl.arange(0, DK)
    d_v = tl.arange(0, DV)
    q = tl.load(Q + ((b * S + rows[:, None]) * H + h) * DK + d_k[None, :])
    q_pos = tl.load(QPOS + b * S + rows)
    q_seg = q_pos
    if HAS_SEG:
        q_seg = tl.load(QSEG + b * S + rows)
    m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, DV), tl.float32)
    num_full = tl.load(PLAN + i * PLAN_W)
    num = tl.load(PLAN + i * PLAN_W + 1)
    for masked in tl.static_range(2):
        lo = 0 if masked == 0 else num_full
        hi = num_full if masked == 0 else num
        for j in range(lo, hi):
            cols = tl.load(PLAN + i * PLAN_W + 2 + j) * BLOCK_K + tl.arange(0, BLOCK_K)
            k = tl.load(K + ((b * T + cols[:, None]) * G + g) * DK + d_k[None, :])
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE
            ok = tl.full((BLOCK_Q, BLOCK_K), 1, tl.int1)
            if masked == 1:
                qq = q_pos[:, None]
                kk = tl.load(KVPOS + b * T + cols)[None, :]
                ok = kk >= 0
                if CAUSAL:
                    ok = ok & (kk <= qq)
                if WINDOW > 0:
                    ok = ok & (kk > qq - WINDOW)
                if LOZA_BLOCK > 0:
                    ok = ok & ((kk // LOZA_BLOCK < LOZA_SINK)
                               | (kk // LOZA_BLOCK >= qq // LOZA_BLOCK - (LOZA_LOCAL - 1)))
            if HAS_SEG:
                ok = ok & (q_seg[:, None] == tl.load(KVSEG + b * T + cols)[None, :])
            if masked == 1 or HAS_SEG:
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: exact zeros
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = alpha * l_i + tl.sum(p, 1)
            v = tl.load(V + ((b * T + cols[:, None]) * G + g) * DV + d_v[None, :])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(OUT + ((b * S + rows[:, None]) * H + h) * DV + d_v[None, :],
             out.to(OUT.dtype.element_ty))
    lse = tl.where(nonempty, (m_i + tl.math.log2(l_safe)) * LN_2, float("-inf"))
    tl.store(LSE + (b * H + h) * S + rows, lse)


@triton.jit
@typing.no_type_check  # keep runtime type-check hooks off the kernel body
def attention_dq(Q, K, V, QPOS, KVPOS, QSEG, KVSEG, DO, LSE, DELTA, PLAN, DQ,
                 S: tl.constexpr, T: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                 DK: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_K: tl.constexpr, PLAN_W: tl.constexpr, QK_SCALE: tl.constexpr,
                 SCALE: tl.constexpr, HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr,
                 WINDOW: tl.constexpr, LOZA_BLOCK: tl.constexpr, LOZA_SINK: tl.constexpr,
                 LOZA_LOCAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit offsets: B*S*H*D may pass 2**31
    h = bh % H
    g = h // (H // G)
    rows = i * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d_k = tl.arange(0, DK)
    d_v = tl.arange(0, DV)
    q = tl.load(Q + ((b * S + rows[:, None]) * H + h) * DK + d_k[None, :])
    d_out = tl.load(DO + ((b * S + rows[:, None]) * H + h) * DV + d_v[None, :])
    lse = tl.load(LSE + (b * H + h) * S + rows)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2_E)  # empty rows: P = 0
    delta = tl.load(DELTA + (b * H + h) * S + rows)
    q_pos = tl.load(QPOS + b * S + rows)
    q_seg = q_pos
    if HAS_SEG:
        q_seg = tl.load(QSEG + b * S + rows)
    dq = tl.zeros((BLOCK_Q, DK), tl.float32)
    num_full = tl.load(PLAN + i * PLAN_W)
    num = tl.load(PLAN + i * PLAN_W + 1)
    for masked in tl.static_range(2):
        lo = 0 if masked == 0 else num_full
        hi = num_full if masked == 0 else num
        for j in range(lo, hi):
            cols = tl.load(PLAN + i * PLAN_W + 2 + j) * BLOCK_K + tl.arange(0, BLOCK_K)
            k = tl.load(K + ((b * T + cols[:, None]) * G + g) * DK + d_k[None, :])
            v = tl.load(V + ((b * T + cols[:, None]) * G + g) * DV + d_v[None, :])
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE
            ok = tl.full((BLOCK_Q, BLOCK_K), 1, tl.int1)
            if masked == 1:
                qq = q_pos[:, None]
                kk = tl.load(KVPOS + b * T + cols)[None, :]
                ok = kk >= 0
                if CAUSAL:
                    ok = ok & (kk <= qq)
                if WINDOW > 0:
                    ok = ok & (kk > qq - WINDOW)
                if LOZA_BLOCK > 0:
                    ok = ok & ((kk // LOZA_BLOCK < LOZA_SINK)
                               | (kk // LOZA_BLOCK >= qq // LOZA_BLOCK - (LOZA_LOCAL - 1)))
            if HAS_SEG:
                ok = ok & (q_seg[:, None] == tl.load(KVSEG + b * T + cols)[None, :])
            if masked == 1 or HAS_SEG:
                s = tl.where(ok, s, float("-inf"))
            p = tl.math.exp2(s - lse2[:, None])
            dp = tl.dot(d_out, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + ((b * S + rows[:, None]) * H + h) * DK + d_k[None, :],
             (dq * SCALE).to(DQ.dtype.element_ty))


@triton.jit
@typing.no_type_check  # keep runtime type-check hooks off the kernel body
def attention_dkv(Q, K, V, QPOS, KVPOS, QSEG, KVSEG, DO, LSE, DELTA, PLAN, DK_OUT, DV_OUT,
                  S: tl.constexpr, T: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                  DK: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr,
                  BLOCK_K: tl.constexpr, PLAN_W: tl.constexpr, QK_SCALE: tl.constexpr,
                  SCALE: tl.constexpr, HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr,
                  WINDOW: tl.constexpr, LOZA_BLOCK: tl.constexpr, LOZA_SINK: tl.constexpr,
                  LOZA_LOCAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # One program per (key block, batch, kv head): loops over the group's query heads and the
    # query blocks that see this key block (transposed plan), so dK/dV need no atomics.
    jb = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // G).to(tl.int64)
    g = bg % G
    cols = jb * BLOCK_K + tl.arange(0, BLOCK_K)
    d_k = tl.arange(0, DK)
    d_v = tl.arange(0, DV)
    k = tl.load(K + ((b * T + cols[:, None]) * G + g) * DK + d_k[None, :])
    v = tl.load(V + ((b * T + cols[:, None]) * G + g) * DV + d_v[None, :])
    k_pos = tl.load(KVPOS + b * T + cols)
    k_seg = k_pos
    if HAS_SEG:
        k_seg = tl.load(KVSEG + b * T + cols)
    dk = tl.zeros((BLOCK_K, DK), tl.float32)
    dv = tl.zeros((BLOCK_K, DV), tl.float32)
    num_full = tl.load(PLAN + jb * PLAN_W)
    num = tl.load(PLAN + jb * PLAN_W + 1)
    for hh in range(0, H // G):
        h = g * (H // G) + hh
        for masked in tl.static_range(2):
            lo = 0 if masked == 0 else num_full
            hi = num_full if masked == 0 else num
            for j in range(lo, hi):
                rows = tl.load(PLAN + jb * PLAN_W + 2 + j) * BLOCK_Q + tl.arange(0, BLOCK_Q)
                q = tl.load(Q + ((b * S + rows[:, None]) * H + h) * DK + d_k[None, :])
                d_out = tl.load(DO + ((b * S + rows[:, None]) * H + h) * DV + d_v[None, :])
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE
                ok = tl.full((BLOCK_Q, BLOCK_K), 1, tl.int1)
                if masked == 1:
                    qq = tl.load(QPOS + b * S + rows)[:, None]
                    kk = k_pos[None, :]
                    ok = kk >= 0
                    if CAUSAL:
                        ok = ok & (kk <= qq)
                    if WINDOW > 0:
                        ok = ok & (kk > qq - WINDOW)
                    if LOZA_BLOCK > 0:
                        ok = ok & ((kk // LOZA_BLOCK < LOZA_SINK)
                                   | (kk // LOZA_BLOCK >= qq // LOZA_BLOCK - (LOZA_LOCAL - 1)))
                if HAS_SEG:
                    ok = ok & (tl.load(QSEG + b * S + rows)[:, None] == k_seg[None, :])
                if masked == 1 or HAS_SEG:
                    s = tl.where(ok, s, float("-inf"))
                lse = tl.load(LSE + (b * H + h) * S + rows)
                lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2_E)
                p = tl.math.exp2(s - lse2[:, None])
                dv += tl.dot(tl.trans(p.to(d_out.dtype)), d_out, input_precision=DOT_PRECISION)
                dp = tl.dot(d_out, tl.trans(v), input_precision=DOT_PRECISION)
                ds = p * (dp - tl.load(DELTA + (b * H + h) * S + rows)[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    tl.store(DK_OUT + ((b * T + cols[:, None]) * G + g) * DK + d_k[None, :],
             (dk * SCALE).to(DK_OUT.dtype.element_ty))
    tl.store(DV_OUT + ((b * T + cols[:, None]) * G + g) * DV + d_v[None, :],
             dv.to(DV_OUT.dtype.element_ty))
