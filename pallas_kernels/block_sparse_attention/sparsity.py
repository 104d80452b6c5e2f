"""What every kernel backend shares: host-side block plans, the in-kernel element predicate, and
the padding / custom-VJP plumbing around a backend's forward and backward kernels.

A `BlockPlan` is `masks.BlockMetadata` reordered for kernels: for each query block the active key
blocks with the FULL ones first (no element mask) and the PARTIAL ones after, and the transposed
lists (active query blocks per key block) for the dK/dV pass. Kernels run two loops, unmasked
then masked, so a full block never pays for the mask.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import masks

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLists:
    """Compacted block lists, one row per outer block (host numpy, int32).

    blocks[i, :num[i]] are the inner blocks to visit, the first num_full[i] of them FULL (no element
    mask), the rest PARTIAL; entries past num[i] repeat the last one (a pipelined kernel then
    re-fetches a block it already holds).
    """

    blocks: np.ndarray  # [outer, width]
    num_full: np.ndarray  # [outer]
    num: np.ndarray  # [outer]

    @property
    def width(self) -> int:
        return self.blocks.shape[1]

    def packed(self, width: int | None = None) -> np.ndarray:
        """[outer, 2 + width] int32: (num_full, num, blocks...), width padded by repetition."""
        width = self.width if width is None else width
        pad = np.repeat(self.blocks[:, -1:], width - self.width, axis=1)
        return np.concatenate([self.num_full[:, None], self.num[:, None], self.blocks, pad],
                              axis=1).astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockPlan:
    """Forward / dQ lists (per query block) and dK/dV lists (per key block) for one problem."""

    block_q: int
    block_k: int
    num_q_blocks: int
    num_kv_blocks: int
    by_q: BlockLists  # key blocks per query block
    by_kv: BlockLists  # query blocks per key block
    density: float


def _compact(state: np.ndarray) -> BlockLists:
    """Rows of EMPTY/PARTIAL/FULL -> FULL-first compacted lists, stable within each kind."""
    rank = np.where(state == masks.FULL, 0, np.where(state == masks.PARTIAL, 1, 2))
    order = np.argsort(rank, axis=1, kind="stable").astype(np.int32)
    num = (state != masks.EMPTY).sum(axis=1).astype(np.int32)
    num_full = (state == masks.FULL).sum(axis=1).astype(np.int32)
    width = max(1, int(num.max(initial=0)))
    order = order[:, :width]
    slot = np.arange(width)[None, :]
    last = np.take_along_axis(order, np.maximum(num - 1, 0)[:, None], axis=1)
    last = np.where(num[:, None] > 0, last, 0)
    blocks = np.where(slot < num[:, None], order, last).astype(np.int32)
    for x in (blocks, num, num_full):
        x.setflags(write=False)
    return BlockLists(blocks, num_full, num)


@functools.lru_cache(maxsize=256)
def block_plan(layout: masks.Layout | None, s_len: int, t_len: int, block_q: int, block_k: int,
               s_pad: int, t_pad: int) -> BlockPlan:
    """Plan for queries arange(s_len) against keys arange(t_len), over padded extents s_pad,
    t_pad (blocks wholly in the padding are EMPTY; a ragged last key block is PARTIAL, so the
    kernel masks padded keys). With `layout=None` (positions only known at run time) every block
    is PARTIAL: a dense visit with the element mask.
    """
    nq, nk = s_pad // block_q, t_pad // block_k
    if layout is None:
        state = np.full((nq, nk), masks.PARTIAL, np.int8)
    else:
        meta = layout.block_metadata(s_len, t_len, block_q, block_k).block_state
        state = np.zeros((nq, nk), np.int8)  # EMPTY
        state[:meta.shape[0], :meta.shape[1]] = meta
    density = float((state != masks.EMPTY).sum()) / state.size
    return BlockPlan(block_q, block_k, nq, nk, _compact(state), _compact(state.T), density)


# ---- the element predicate evaluated inside kernels ----

def _contains(layout: masks.Layout, kind: type) -> bool:
    if isinstance(layout, (masks.AndLayout, masks.OrLayout)):
        return any(_contains(m, kind) for m in layout.layouts)
    return isinstance(layout, kind)


def _under_or_block_mask(layout: masks.Layout, under_or: bool = False) -> bool:
    if isinstance(layout, masks.BlockMaskLayout):
        return under_or
    if isinstance(layout, (masks.AndLayout, masks.OrLayout)):
        under_or = under_or or isinstance(layout, masks.OrLayout)
        return any(_under_or_block_mask(m, under_or) for m in layout.layouts)
    return False


def _block_mask_sizes(layout: masks.Layout) -> list[int]:
    if isinstance(layout, masks.BlockMaskLayout):
        return [layout.block_size]
    if isinstance(layout, (masks.AndLayout, masks.OrLayout)):
        return sum((_block_mask_sizes(m) for m in layout.layouts), [])
    return []


def max_aligned_block(layout: masks.Layout) -> int | None:
    """Largest power of two dividing every BlockMaskLayout block size in `layout` (None if none):
    kernel blocks no larger than this see a constant table entry per block."""
    sizes = _block_mask_sizes(layout)
    if not sizes:
        return None
    g = functools.reduce(math.gcd, sizes)
    return g & -g


def check_layout(layout: masks.Layout, block_q: int, block_k: int, default_positions: bool,
                 backend: str) -> None:
    """Raise NotImplementedError if kernels cannot evaluate `layout` elementwise in-kernel.

    A BlockMaskLayout's table lookup cannot run inside a kernel. Kernels handle it when its table
    entry is constant over each kernel block and known to be 1 on every visited block: default
    positions, kernel blocks dividing its block size, and no OrLayout above it.
    """
    if not _contains(layout, masks.BlockMaskLayout):
        return
    aligned = max_aligned_block(layout)
    why = None
    if not default_positions:
        why = "explicit q/kv positions"
    elif _under_or_block_mask(layout):
        why = "a BlockMaskLayout inside an OrLayout"
    elif block_q > aligned or block_k > aligned or aligned % block_q or aligned % block_k:
        why = f"kernel blocks ({block_q}, {block_k}) not dividing the mask block {aligned}"
    if why:
        raise NotImplementedError(
            f"{backend}: layout={layout!r} with {why} is not supported; supported: Full, Causal, "
            "SlidingWindow, Loza layouts and their &/| compositions, and BlockMaskLayout under "
            "default positions with aligned kernel blocks and no OrLayout above it")


def _kernel_layout(layout: masks.Layout) -> masks.Layout:
    """`layout` with each BlockMaskLayout replaced by causal (valid under `check_layout`)."""
    if isinstance(layout, masks.BlockMaskLayout):
        return masks.CausalLayout()
    if isinstance(layout, masks.AndLayout):
        return masks.AndLayout(tuple(_kernel_layout(m) for m in layout.layouts))
    if isinstance(layout, masks.OrLayout):
        return masks.OrLayout(tuple(_kernel_layout(m) for m in layout.layouts))
    return layout


def element_mask(layout: masks.Layout, q_pos, k_pos, q_seg=None, k_seg=None):
    """In-kernel mask [bq, bk] from position vectors [bq] and [bk] (k < 0: empty or padding)."""
    q, k = q_pos[:, None], k_pos[None, :]
    mask = _kernel_layout(layout)._allowed(q, k, jnp) & (k >= 0)
    if q_seg is not None:
        mask &= q_seg[:, None] == k_seg[None, :]
    return mask


def segment_mask(q_seg, k_seg):
    return q_seg[:, None] == k_seg[None, :]


# ---- padding and the custom VJP shared by the backends ----

@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of one call, handed to a backend's kernels (hashable)."""

    layout: masks.Layout
    scale: float
    block_q: int  # forward / dQ blocks
    block_k: int
    block_q_bwd: int  # dK/dV and dQ blocks
    block_k_bwd: int
    s_len: int  # as given
    t_len: int
    s_pad: int  # padded to a multiple of both query blocks
    t_pad: int  # padded to a multiple of both key blocks
    default_positions: bool  # plan from the layout; else every block partial
    has_segments: bool
    d_k: int  # as given (before any head-dim padding)
    d_v: int

    @property
    def plan(self) -> BlockPlan:
        return block_plan(self.layout if self.default_positions else None, self.s_len,
                          self.t_len, self.block_q, self.block_k, self.s_pad, self.t_pad)

    @property
    def plan_bwd(self) -> BlockPlan:
        return block_plan(self.layout if self.default_positions else None, self.s_len,
                          self.t_len, self.block_q_bwd, self.block_k_bwd, self.s_pad,
                          self.t_pad)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def prepare(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, *, s_pad: int,
            t_pad: int, pad_head_dims_to_pow2: bool):
    """Pad S, T to block multiples (padded keys get position -1: never attended) and, for
    backends that need it, head dims to powers of two (zeros leave q.k and p.v unchanged).
    Returns padded (q, k, v, q_pos, kv_pos, q_seg, kv_seg)."""
    batch, s_len, _, d_k = q.shape
    t_len, d_v = k.shape[1], v.shape[3]
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(s_len, dtype=jnp.int32), (batch, s_len))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(t_len, dtype=jnp.int32), (batch, t_len))
    q_pos = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, s_pad - s_len)))
    kv_pos = jnp.pad(kv_positions.astype(jnp.int32), ((0, 0), (0, t_pad - t_len)),
                     constant_values=-1)
    q_seg = kv_seg = None
    if q_segment_ids is not None:
        q_seg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, s_pad - s_len)))
        kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t_len)))
    dk_pad = next_pow2(d_k) if pad_head_dims_to_pow2 else d_k
    dv_pad = next_pow2(d_v) if pad_head_dims_to_pow2 else d_v
    q = jnp.pad(q, ((0, 0), (0, s_pad - s_len), (0, 0), (0, dk_pad - d_k)))
    k = jnp.pad(k, ((0, 0), (0, t_pad - t_len), (0, 0), (0, dk_pad - d_k)))
    v = jnp.pad(v, ((0, 0), (0, t_pad - t_len), (0, 0), (0, dv_pad - d_v)))
    return q, k, v, q_pos, kv_pos, q_seg, kv_seg


Forward = Callable[..., tuple[Any, Any]]  # (problem, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
Backward = Callable[..., tuple[Any, Any, Any]]  # (..., out, lse, d_out, delta) -> dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def attention_vjp(problem: Problem, forward: Forward, backward: Backward, q, k, v, q_pos,
                  kv_pos, q_seg, kv_seg):
    """out [B,S,H,Dv] and lse [B,H,S] (natural log, float32) from a backend's kernels, with the
    FlashAttention-2 backward. Rows with no key: out 0, lse -inf."""
    return forward(problem, q, k, v, q_pos, kv_pos, q_seg, kv_seg)


def _vjp_fwd(problem, forward, backward, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = forward(problem, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _vjp_bwd(problem, forward, backward, residuals, cotangents):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
    d_out, d_lse = cotangents
    # delta_i = rowsum(dO * O) - dlse_i: with it, dS = P * (dP - delta) also carries the lse
    # cotangent (d lse / d s_ij = P_ij). float32: it is subtracted from dP of similar size.
    delta_bhs = jnp.einsum("BSHD,BSHD->BHS", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta_bhs = delta_bhs - d_lse.astype(jnp.float32)
    dq, dk, dv = backward(problem, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, d_out,
                          delta_bhs)
    return dq, dk, dv, None, None, None, None


attention_vjp.defvjp(_vjp_fwd, _vjp_bwd)


def run(problem: Problem, forward: Forward, backward: Backward, q, k, v, q_pos, kv_pos, q_seg,
        kv_seg, *, return_lse: bool):
    """Call the kernels on padded inputs and slice the result back to the caller's shapes."""
    out, lse = attention_vjp(problem, forward, backward, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    out = out[:, :problem.s_len, :, :problem.d_v]
    lse = lse[:, :, :problem.s_len]
    return (out, lse) if return_lse else out


def make_problem(q, k, v, *, layout: masks.Layout, scale: float, default_positions: bool,
                 has_segments: bool, block_q: int, block_k: int, block_q_bwd: int,
                 block_k_bwd: int) -> Problem:
    """The static problem for (unpadded) q, k, v and the chosen blocks."""
    s_len, t_len = q.shape[1], k.shape[1]
    return Problem(layout=layout, scale=float(scale), block_q=block_q, block_k=block_k,
                   block_q_bwd=block_q_bwd, block_k_bwd=block_k_bwd, s_len=s_len, t_len=t_len,
                   s_pad=round_up(s_len, math.lcm(block_q, block_q_bwd)),
                   t_pad=round_up(t_len, math.lcm(block_k, block_k_bwd)),
                   default_positions=default_positions, has_segments=has_segments,
                   d_k=q.shape[3], d_v=v.shape[3])


def plan(name: str, q, k, v, *, layout, scale, config, q_positions, kv_positions, q_segment_ids,
         min_block: int, block_rule: str):
    """The backends' shared preamble: hardware block-size floor, layout support in both the
    forward and backward tilings, then the host-side Problem (block lists, padding)."""
    if not config.interpret:
        small = min(config.block_q, config.block_k, config.block_q_bwd, config.block_k_bwd)
        if small < min_block:
            raise NotImplementedError(f"{name}: block size {small} is not supported on hardware; "
                                      f"supported: {block_rule}")
    default_positions = q_positions is None and kv_positions is None
    for block_q, block_k in ((config.block_q, config.block_k),
                             (config.block_q_bwd, config.block_k_bwd)):
        check_layout(layout, block_q, block_k, default_positions, name)
    return make_problem(
        q, k, v, layout=layout, scale=scale, default_positions=default_positions,
        has_segments=q_segment_ids is not None, block_q=config.block_q, block_k=config.block_k,
        block_q_bwd=config.block_q_bwd, block_k_bwd=config.block_k_bwd)
