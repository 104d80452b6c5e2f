"""What the kernel backends share: the K plan (blocks, groups, splits), int4 tile unpacking, the
float epilogue and the dense / grouped row-tile tables.

Accumulators: A8 per-channel and Integer Scale accumulate in int32; A8 float groups and A16 in
float32. With split_k > 1 a kernel stores its split's accumulator and `finish` sums the splits
(int32 sums are exact, so the integer modes stay bit-exact) and applies the epilogue.

int4 weights in A8 modes use OdysseyLLM's SINT4toS8 (techniques.md §3): for a packed byte p,
`p << 4` = 16·lo and `p & 0xF0` = 16·hi as int8, one op per nibble and no sign extension; the
int8 MMA then yields 16·acc. Per-channel and float-group modes fold the 1/16 into the epilogue
(a power of two: exact); Integer Scale shifts each group's 16·part right by 4 (exact) before
multiplying by s_int, so its int32 bound stays reference.accumulator_bound. The per-channel
bound becomes K·2^14 (as W8A8). Even k pair with lo, odd k with hi: the wrappers split x into
its even and odd columns (`split_even_odd`) so each half meets one nibble in its own dot.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.grouped_matmul import metadata
from pallas_kernels.quant_matmul.reference import Mode


def acc_dtype(mode: Mode):
    """int32 for A8 per-channel and Integer Scale, float32 for A8 float groups and A16."""
    if mode.a8 and (mode.group_size is None or mode.integer_scale):
        return jnp.int32
    return jnp.float32


def sixteen_times(mode: Mode) -> bool:
    """Whether the accumulator holds 16x the true sum (A8 int4 weights, SINT4toS8)."""
    return mode.bits == 4 and mode.a8 and not mode.integer_scale


def unpack_tile(p, *, a8: bool, dtype, wide: bool = False):
    """Packed int8 tile -> (even-k operand, odd-k operand). A8: 16·lo and 16·hi in int8
    (SINT4toS8); A16: sign-extended lo and hi cast to the activation dtype (exact).
    wide: the same bits computed in int32 lanes (Mosaic TPU has no int8 vector shifts)."""
    if wide:
        p32 = p.astype(jnp.int32)
        if a8:  # 16·lo = (p << 28) >> 24, 16·hi = p & ~0xF, both in [-128, 112]
            return (jnp.right_shift(jnp.left_shift(p32, 28), 24).astype(jnp.int8),
                    (p32 & -16).astype(jnp.int8))
        return (jnp.right_shift(jnp.left_shift(p32, 28), 28).astype(dtype),
                jnp.right_shift(p32, 4).astype(dtype))
    if a8:
        return jnp.left_shift(p, 4), p & jnp.int8(-16)
    lo = jnp.right_shift(jnp.left_shift(p, 4), 4)
    return lo.astype(dtype), jnp.right_shift(p, 4).astype(dtype)


def split_even_odd(x):
    """x [M, K] -> (x[:, 0::2], x[:, 1::2]): the activations met by the low / high nibbles."""
    return x[:, 0::2], x[:, 1::2]


def epilogue(acc, x_scale, w_scale, *, mode: Mode, alpha):
    """Accumulator [bm, bn] -> float32 y, in reference.py's order. x_scale [bm, 1] (A8), w_scale
    [1, bn] for per-channel modes (else unused: groups were applied in the main loop)."""
    y = acc.astype(jnp.float32)
    if sixteen_times(mode):
        y = y * jnp.float32(1 / 16)  # exact: a power of two
    if not mode.a8:
        return y * w_scale if mode.group_size is None else y
    if mode.group_size is None:
        return (y * x_scale) * w_scale
    if mode.integer_scale:
        return y * x_scale * jnp.float32(1 / alpha)
    return y * x_scale


def finish(partials, x_scale, w_scale, *, mode: Mode, alpha, out_dtype, row_expert=None):
    """Sum split-K partial accumulators [S, M, N] and apply the epilogue (XLA, fused).
    row_expert [M] (grouped): picks each row's per-channel w_scale [E, N]."""
    acc = jnp.sum(partials, axis=0, dtype=partials.dtype)
    xs = None if x_scale is None else x_scale[:, None]
    if mode.group_size is not None:
        ws = None
    elif row_expert is None:
        ws = w_scale.reshape(1, -1)
    else:
        ws = w_scale[jnp.minimum(row_expert, w_scale.shape[0] - 1)]
    return epilogue(acc, xs, ws, mode=mode, alpha=alpha).astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class KPlan:
    """The contraction loop in packed rows of w (K·bits/8): block_kp rows per step, steps per
    group (grouped modes; 1 group = the whole split otherwise), splits of whole groups."""

    kp_dim: int
    block_kp: int
    num_blocks: int
    split_k: int
    blocks_per_split: int
    blocks_per_group: int  # == blocks_per_split without groups

    @property
    def groups_per_split(self) -> int:
        return self.blocks_per_split // self.blocks_per_group


def k_plan(name: str, mode: Mode, k_dim: int, block_k: int, split_k: int) -> KPlan:
    """Check block_k / split_k against K and the group size; NotImplementedError naming the
    value otherwise. Without groups the last block may be partial (masked loads)."""
    per_byte = 8 // mode.bits
    g = mode.group_size
    if g is not None:
        if g % block_k:
            raise NotImplementedError(
                f"{name}: block_k={block_k} must divide group_size={g} (each group's scale is "
                "applied once its blocks are summed); take block_k <= group_size, a power of 2")
        if g % per_byte:
            raise NotImplementedError(f"{name}: group_size={g} must be even with bits=4")
    if block_k % per_byte:
        raise NotImplementedError(f"{name}: block_k={block_k} must be even with bits=4")
    kp_dim, block_kp = k_dim // per_byte, block_k // per_byte
    num_blocks = -(-kp_dim // block_kp)
    unit = 1 if g is None else g // block_k  # splits hold whole groups
    if split_k < 1 or num_blocks % (unit * split_k):
        raise NotImplementedError(
            f"{name}: split_k={split_k} must divide the {num_blocks // unit} "
            f"{'groups' if g else 'K blocks'} (K={k_dim}, block_k={block_k}"
            f"{f', group_size={g}' if g else ''})")
    return KPlan(kp_dim=kp_dim, block_kp=block_kp, num_blocks=num_blocks, split_k=split_k,
                 blocks_per_split=num_blocks // split_k,
                 blocks_per_group=unit if g is not None else num_blocks // split_k)


def pick_split_k(num_units: int, programs: int, target: int) -> int:
    """Largest power-of-two split dividing num_units that keeps programs * split <= target."""
    split = 1
    while (num_units % (split * 2) == 0 and programs * split * 2 <= target
           and num_units // (split * 2) >= 2):
        split *= 2
    return split


def dense_row_tiles(num_rows: int, block_m: int):
    """The grouped row-tile table (grouped_matmul.metadata.row_tiles) of a dense matmul: expert
    0 owns every row."""
    num_tiles = -(-num_rows // block_m)
    starts = jnp.arange(num_tiles, dtype=jnp.int32) * block_m
    return jnp.stack([jnp.zeros_like(starts), starts, jnp.full_like(starts, num_rows)])


def grouped_row_tiles(group_sizes, num_rows: int, block_m: int):
    return metadata.row_tiles(group_sizes, num_rows, block_m).table


def row_experts(group_sizes, num_rows: int):
    """Expert of each row; E for rows past sum(group_sizes)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right")


def as_tuple_x(x, mode: Mode):
    """Kernel activation operands: (x,) for int8 weights, (x_even, x_odd) for packed int4."""
    return (x,) if mode.bits == 8 else split_even_odd(x)


def cost(m: int, k: int, n: int, mode: Mode, num_experts: int = 1, x_itemsize: int = 1):
    return dict(flops=2 * m * k * n, transcendentals=0,
                bytes_accessed=m * k * x_itemsize + num_experts * k * n * mode.bits // 8
                + m * n * 4)

