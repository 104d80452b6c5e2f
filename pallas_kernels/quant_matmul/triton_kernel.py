"""Triton kernel for quant_matmul / quant_gmm: plain `@triton.jit`, importable without jax.

The algorithm of pallas_gpu_kernel.py with the pointer arithmetic written out: grid (n tiles,
row tiles, K splits), row tile i = (expert, start, end) from an int32 [3, NUM_TILES] table
(expert == NUM_EXPERTS: tail rows, stored as zeros; start == end: idle). Arrays are dense
row-major: x [M, K], w [E, KP, N] (KP = K or K/2 packed), w_scale [E, N] or [E, K/GROUP, N],
x_scale [M]. With int4 weights x is read at even and odd columns directly (stride-2 pointers),
each half meeting one nibble in its own tl.dot; A8 uses SINT4toS8 (`p << 4` = 16·lo,
`p & 0xF0` = 16·hi), see common.py. GROUP == 0 means per-channel scales. PARTIAL stores the raw
accumulator of split s at out[s] (common.finish completes it).

`quant_matmul_launch` gives the grid and constexprs; the jax-triton wrapper (triton.py) and the
interpreter tests (torch tensors) both use it.
"""

from __future__ import annotations

import typing

import triton
import triton.language as tl


@triton.jit
@typing.no_type_check  # keep runtime type-check hooks off the kernel body
def _block_dot(x_ptr, w_base, rows, row_ok, cols, col_ok, b, kk,
               K: tl.constexpr, KP: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr,
               A8: tl.constexpr, BLOCK_KP: tl.constexpr, IEEE_DOT: tl.constexpr):
    kp = b * BLOCK_KP + kk
    k_ok = kp < KP
    p = tl.load(w_base + kp[:, None] * N + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                other=0)
    x_row = x_ptr + rows[:, None].to(tl.int64) * K
    x_mask = row_ok[:, None] & k_ok[None, :]
    if BITS == 8:
        a = tl.load(x_row + kp[None, :], mask=x_mask, other=0)
        if A8:
            part = tl.dot(a, p, out_dtype=tl.int32)
        elif IEEE_DOT:
            part = tl.dot(a, p.to(a.dtype), input_precision="ieee")
        else:
            part = tl.dot(a, p.to(a.dtype))
    else:
        a_even = tl.load(x_row + 2 * kp[None, :], mask=x_mask, other=0)
        a_odd = tl.load(x_row + 2 * kp[None, :] + 1, mask=x_mask, other=0)
        lo16 = (p << 4).to(tl.int8)  # 16·lo (and the sign) in one shift
        if A8:
            hi16 = (p & -16).to(tl.int8)  # 16·hi: p & 0xF0
            part = tl.dot(a_even, lo16, out_dtype=tl.int32)
            part += tl.dot(a_odd, hi16, out_dtype=tl.int32)
        else:
            lo = (lo16 >> 4).to(a_even.dtype)
            hi = (p >> 4).to(a_even.dtype)
            if IEEE_DOT:
                part = tl.dot(a_even, lo, input_precision="ieee")
                part += tl.dot(a_odd, hi, input_precision="ieee")
            else:
                part = tl.dot(a_even, lo)
                part += tl.dot(a_odd, hi)
    return part


@triton.jit
@typing.no_type_check  # keep runtime type-check hooks off the kernel body
def quant_matmul_kernel(tiles_ptr, x_ptr, w_ptr, ws_ptr, xs_ptr, out_ptr,
                        M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, KP: tl.constexpr,
                        NUM_TILES: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                        BITS: tl.constexpr, A8: tl.constexpr, GROUP: tl.constexpr,
                        NUM_GROUPS: tl.constexpr, INT_SCALE: tl.constexpr,
                        INV_ALPHA: tl.constexpr, SIXTEEN: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr,
                        BLOCKS_PER_SPLIT: tl.constexpr, BLOCKS_PER_GROUP: tl.constexpr,
                        PARTIAL: tl.constexpr, IEEE_DOT: tl.constexpr):
    n_i = tl.program_id(0)
    tile = tl.program_id(1)
    s_i = tl.program_id(2)
    expert = tl.load(tiles_ptr + tile)
    start = tl.load(tiles_ptr + NUM_TILES + tile)
    end = tl.load(tiles_ptr + 2 * NUM_TILES + tile)
    rows = start + tl.arange(0, BLOCK_M)
    cols = n_i * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_KP)
    row_ok = rows < M
    col_ok = cols < N
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    if PARTIAL:
        out_ptrs += s_i.to(tl.int64) * (M * N)
    out_mask = (rows[:, None] < end) & col_ok[None, :]
    if start < end:
        if expert == NUM_EXPERTS:  # tail rows: no weight, output 0
            tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), out_ptr.dtype.element_ty),
                     mask=out_mask)
        else:
            w_base = w_ptr + expert.to(tl.int64) * (KP * N)
            ws_base = ws_ptr + expert.to(tl.int64) * (NUM_GROUPS * N)
            if A8 and (GROUP == 0 or INT_SCALE):
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            first = s_i * BLOCKS_PER_SPLIT
            for gi in range(0, BLOCKS_PER_SPLIT // BLOCKS_PER_GROUP):
                b0 = first + gi * BLOCKS_PER_GROUP
                part = _block_dot(x_ptr, w_base, rows, row_ok, cols, col_ok, b0, kk, K, KP, N,
                                  BITS, A8, BLOCK_KP, IEEE_DOT)
                for j in range(1, BLOCKS_PER_GROUP):
                    part += _block_dot(x_ptr, w_base, rows, row_ok, cols, col_ok, b0 + j, kk,
                                       K, KP, N, BITS, A8, BLOCK_KP, IEEE_DOT)
                if GROUP == 0:
                    acc += part
                else:
                    scale = tl.load(ws_base + (b0 // BLOCKS_PER_GROUP) * N + cols, mask=col_ok,
                                    other=0)
                    if INT_SCALE:
                        if BITS == 4:
                            part = part >> 4  # 16·part -> part, exact (SINT4toS8)
                        acc += part * scale[None, :]
                    else:
                        acc += part.to(tl.float32) * scale[None, :]
            if PARTIAL:
                tl.store(out_ptrs, acc, mask=out_mask)
            else:
                y = acc.to(tl.float32)
                if SIXTEEN:
                    y = y * 0.0625  # exact: a power of two
                if GROUP == 0:
                    ws = tl.load(ws_base + cols, mask=col_ok, other=0)
                if A8:
                    xs = tl.load(xs_ptr + rows, mask=row_ok, other=0)
                    if GROUP == 0:
                        y = (y * xs[:, None]) * ws[None, :]
                    elif INT_SCALE:
                        y = (y * xs[:, None]) * INV_ALPHA
                    else:
                        y = y * xs[:, None]
                elif GROUP == 0:
                    y = y * ws[None, :]
                tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


def quant_matmul_launch(*, m: int, k: int, n: int, num_tiles: int, num_experts: int, bits: int,
                        a8: bool, group_size: int | None, integer_scale: bool, alpha,
                        sixteen: bool, x_dtype_name: str, block_m: int, block_n: int,
                        block_kp: int, num_blocks: int, split_k: int, blocks_per_group: int
                        ) -> tuple[tuple[int, int, int], dict]:
    """(grid, constexprs) for quant_matmul_kernel."""
    grid = (-(-n // block_n), num_tiles, split_k)
    return grid, dict(
        M=m, K=k, N=n, KP=k * bits // 8, NUM_TILES=num_tiles, NUM_EXPERTS=num_experts, BITS=bits,
        A8=a8, GROUP=group_size or 0, NUM_GROUPS=k // group_size if group_size else 1,
        INT_SCALE=integer_scale, INV_ALPHA=float(1 / alpha) if integer_scale else 1.0,
        SIXTEEN=sixteen, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KP=block_kp,
        BLOCKS_PER_SPLIT=num_blocks // split_k, BLOCKS_PER_GROUP=blocks_per_group,
        PARTIAL=split_k > 1, IEEE_DOT=x_dtype_name == "float32")
