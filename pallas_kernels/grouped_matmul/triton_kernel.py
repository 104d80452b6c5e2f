"""Triton kernels for gmm and tgmm: plain `@triton.jit`, importable without jax or jax-triton.

Same algorithms as pallas_gpu_kernel.py, with the pointer arithmetic written out:
- gmm_kernel, grid (n tiles, row tiles): row tile i is (group, start, end) from
  metadata.row_tiles (an int32 [3, NUM_TILES] table); group == NUM_GROUPS is the tail (rows past
  sum(group_sizes)), stored as zeros; start == end is an idle tile.
- tgmm_kernel, grid (n tiles, k tiles, groups): loops over the group's rows in BLOCK_M chunks
  (offsets is int32 [G+1]) and stores one [BLOCK_K, BLOCK_N] block of out[g].

Arrays are dense row-major. `*_launch` give the grid and constexprs for a shape; the jax-triton
wrapper (triton.py) and the interpreter tests (torch tensors) both use them.
UPCAST_DOT casts bf16 operands to float32 before tl.dot: the Triton interpreter multiplies bf16
as raw uint16 bits, so interpreter runs set it; compiled kernels never do.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gmm_kernel(tiles_ptr, lhs_ptr, rhs_ptr, out_ptr,
               NUM_ROWS: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
               NUM_GROUPS: tl.constexpr, NUM_TILES: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               TRANSPOSE_RHS: tl.constexpr, IEEE_DOT: tl.constexpr,
               UPCAST_DOT: tl.constexpr):
    n_i = tl.program_id(0)
    tile = tl.program_id(1)
    group = tl.load(tiles_ptr + tile)
    start = tl.load(tiles_ptr + NUM_TILES + tile)
    end = tl.load(tiles_ptr + 2 * NUM_TILES + tile)
    rows = start + tl.arange(0, BLOCK_M)
    cols = n_i * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    out_mask = (rows[:, None] < end) & (cols[None, :] < N)
    if start < end:
        if group == NUM_GROUPS:  # tail rows: no weight, output 0
            tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), out_ptr.dtype.element_ty),
                     mask=out_mask)
        else:
            # Rows of the next group are harmless (the store is masked); rows past T are not.
            row_ok = rows < NUM_ROWS
            lhs_ptrs = lhs_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
            rhs_base = rhs_ptr + group.to(tl.int64) * (K * N)
            if TRANSPOSE_RHS:  # rhs [G, N, K], read as [BLOCK_K, BLOCK_N] tiles
                rhs_ptrs = rhs_base + cols[None, :] * K + ks[:, None]
                rhs_step = BLOCK_K
            else:
                rhs_ptrs = rhs_base + ks[:, None] * N + cols[None, :]
                rhs_step = BLOCK_K * N
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = ks < K - k0
                a = tl.load(lhs_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(rhs_ptrs, mask=k_ok[:, None] & (cols[None, :] < N), other=0.0)
                if UPCAST_DOT:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if IEEE_DOT:  # float32 inputs: IEEE products, not tf32 (reference: HIGHEST)
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
                lhs_ptrs += BLOCK_K
                rhs_ptrs += rhs_step
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def tgmm_kernel(offsets_ptr, lhs_ptr, rhs_ptr, out_ptr,
                NUM_ROWS: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    n_i = tl.program_id(0)
    k_i = tl.program_id(1)
    group = tl.program_id(2)
    start = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)
    ks = k_i * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = n_i * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    for row0 in range(start, end, BLOCK_M):
        rows = row0 + chunk
        row_ok = rows < end  # also keeps the next group's rows out
        # lhs read transposed, [BLOCK_K, BLOCK_M], so the contraction is over rows.
        a = tl.load(lhs_ptr + rows[None, :].to(tl.int64) * K + ks[:, None],
                    mask=row_ok[None, :] & (ks[:, None] < K), other=0.0)
        b = tl.load(rhs_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                    mask=row_ok[:, None] & (cols[None, :] < N), other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE_DOT:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    out_ptrs = out_ptr + group.to(tl.int64) * (K * N) + ks[:, None] * N + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=(ks[:, None] < K) & (cols[None, :] < N))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gmm_launch(*, num_rows: int, k_dim: int, n_dim: int, num_groups: int, num_tiles: int,
               transpose_rhs: bool, dtype_name: str, block_m: int, block_n: int, block_k: int,
               upcast_dot: bool = False) -> tuple[tuple[int, ...], dict]:
    """(grid, constexprs) for gmm_kernel."""
    grid = (_cdiv(n_dim, block_n), num_tiles)
    return grid, dict(NUM_ROWS=num_rows, K=k_dim, N=n_dim, NUM_GROUPS=num_groups,
                      NUM_TILES=num_tiles, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      TRANSPOSE_RHS=transpose_rhs, IEEE_DOT=dtype_name == "float32",
                      UPCAST_DOT=upcast_dot)


def tgmm_launch(*, num_rows: int, k_dim: int, n_dim: int, num_groups: int, dtype_name: str,
                block_m: int, block_n: int, block_k: int, upcast_dot: bool = False
                ) -> tuple[tuple[int, ...], dict]:
    """(grid, constexprs) for tgmm_kernel."""
    grid = (_cdiv(n_dim, block_n), _cdiv(k_dim, block_k), num_groups)
    return grid, dict(NUM_ROWS=num_rows, K=k_dim, N=n_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_K=block_k, IEEE_DOT=dtype_name == "float32",
                      UPCAST_DOT=upcast_dot)
