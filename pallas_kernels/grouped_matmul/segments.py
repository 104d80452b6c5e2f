"""The "segments" backend: dropless sorted-segment grouped matmul in row tiles, plain XLA.

Rows (already sorted by group) are laid into a padded buffer where every group starts at a tile
boundary; each tile gathers its group's weight and one batched einsum multiplies all tiles;
results are gathered back. Compute is the used rows plus at most `tile_rows - 1` padding rows
per non-empty group, with no masked contraction against every group (what `ragged_dot` lowers
to on CPU). With `tile_rows=1` (decode-like calls with few rows) each row gathers only its own
group's weight, so a step reads the weights of the groups it routed to and no others.

tgmm (the weight gradient) multiplies lhs^T @ rhs per tile and segment-sums tiles into groups.
The tile count is a static bound, so padding tiles past the used ones are computed on zeros.
With Config.loop (the CPU default at training shapes) the used tiles run one per step of a
while loop that reads each tile's rows and weight in place from the sorted rows (no padded row
buffer, no [tiles, K, N] weight copy) and never visits rows of no group.
Same four names as every backend (see xla.py), plus default_config / search_space.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# float32 at full precision: on GPU/TPU the default would round through tf32/bf16.
_HIGHEST = jax.lax.Precision.HIGHEST
_TILE_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128)
# Cost of copying one tile's weight, in rows of that tile's matmul (per weight element: a
# memory-bound copy against 2 flops per row). About 60-100 on a shared 2-core CPU, where a gmm
# of 8192 rows x 512 -> 256 over 32 groups took 1750 / 185 / 72 / 53 / 62 ms at 1 / 8 / 32 /
# 64 / 128-row tiles (scripts/bench_gmm.py --search).
_GATHER_COST = 100.0
# With at least this many rows per group on average (training, prefill) the matmuls dominate:
# only tiles that pad the compute by at most _MAX_PADDING (at the static bound) compete.
_FLOP_BOUND_ROWS = 8
_MAX_PADDING = 1.2
# Up to this many tiles, each tile's weight is a dynamic slice (see _tile_weights).
_MAX_SLICED_TILES = 16


@dataclasses.dataclass(frozen=True)
class Config:
    """tile_rows: rows per tile; each group is padded up to a multiple of it.
    loop: run the used tiles one per step of a while loop that reads rows and weights in place,
    instead of one batched einsum over copied weights. The same tiles and FLOPs; on CPU 4x
    faster forward and 2x forward + backward at 8192 rows over 32 groups (no [tiles, K, N]
    weight copy), and a MoE-shaped forward + backward (4096 rows, 2/3 routed, 32 groups) about
    a quarter faster again than looping over every padded tile. XLA's cost analysis counts a
    loop body once: check costs on the batched form."""

    tile_rows: int = 32
    loop: bool = False

    def __post_init__(self):
        if not isinstance(self.tile_rows, int) or self.tile_rows <= 0:
            raise ValueError(f"Config.tile_rows={self.tile_rows!r} must be a positive int")
        if not isinstance(self.loop, bool):
            raise ValueError(f"Config.loop={self.loop!r} must be a bool")


def num_tiles(num_rows: int, num_groups: int, tile_rows: int) -> int:
    """Static tile count that holds any split of num_rows rows into num_groups sorted groups:
    ceil(s_g / t) summed over the (at most min(G, rows)) non-empty groups."""
    return (num_rows + min(num_groups, num_rows) * (tile_rows - 1)) // tile_rows


def padding_factor(num_rows: int, num_groups: int, tile_rows: int) -> float:
    """Computed rows / num_rows at the static tile bound."""
    return num_tiles(num_rows, num_groups, tile_rows) * tile_rows / max(num_rows, 1)


def default_config(num_rows: int, k_dim: int, n_dim: int, num_groups: int, dtype,
                   kind: str = "gmm") -> Config:
    """The tile size of least modelled cost, tiles * (_GATHER_COST + rows per tile). Training
    shapes keep the padded compute within _MAX_PADDING, and on CPU loop over the tiles (no
    weight copies); decode shapes are bound by weight reads (few rows: 1-row tiles copy only
    the routed groups' weights; more rows: fewer, wider tiles)."""
    del k_dim, n_dim, dtype, kind
    flop_bound = num_rows >= _FLOP_BOUND_ROWS * num_groups
    best = min((num_tiles(num_rows, num_groups, t) * (_GATHER_COST + t), t)
               for t in _TILE_CANDIDATES
               if t == 1 or not flop_bound
               or padding_factor(num_rows, num_groups, t) <= _MAX_PADDING)
    return Config(tile_rows=best[1], loop=flop_bound and jax.default_backend() == "cpu")


def search_space(num_rows: int, k_dim: int, n_dim: int, num_groups: int, dtype
                 ) -> tuple[Config, ...]:
    """Configs for the benchmark's search."""
    del num_rows, k_dim, n_dim, num_groups, dtype
    return tuple(Config(tile_rows=t, loop=loop) for loop in (False, True)
                 for t in _TILE_CANDIDATES)


def check(lhs, rhs, *, out_dtype, config=None) -> None:
    del lhs, rhs, out_dtype
    if config is not None and not isinstance(config, Config):
        raise ValueError(f"config={config!r} must be a segments.Config")


def _layout(group_sizes, num_rows: int, tile_rows: int):
    """Index maps between the sorted rows and the tile-aligned padded buffer.

    Returns (row_of_slot [P], group_of_tile [NT], slot_of_row [T]), P = NT * tile_rows; an
    index equal to num_rows / num_groups / P marks a slot, tile or row that holds no row."""
    g = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes), num_rows)  # a sum past T is clipped to T
    starts = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])
    tiles = (ends - starts + tile_rows - 1) // tile_rows
    tile_ends = jnp.cumsum(tiles)
    tile_starts = tile_ends - tiles
    nt = num_tiles(num_rows, g, tile_rows)
    # searchsorted(..., side="right") by comparing with every end: G is small.
    group_of_tile = jnp.sum(jnp.arange(nt)[:, None] >= tile_ends[None, :], axis=1)  # [NT]
    gt = jnp.minimum(group_of_tile, g - 1)
    slot = jnp.arange(nt * tile_rows)
    gs = jnp.repeat(gt, tile_rows, total_repeat_length=nt * tile_rows)  # group of each slot
    row = starts[gs] + slot - tile_starts[gs] * tile_rows
    used = (jnp.repeat(group_of_tile, tile_rows, total_repeat_length=nt * tile_rows) < g) & (
        row < ends[gs])
    row_of_slot = jnp.where(used, row, num_rows)
    rows = jnp.arange(num_rows)
    group_of_row = jnp.sum(rows[:, None] >= ends[None, :], axis=1)  # [T], G past the groups
    gr = jnp.minimum(group_of_row, g - 1)
    slot_of_row = jnp.where(group_of_row < g, tile_starts[gr] * tile_rows + rows - starts[gr],
                            nt * tile_rows)
    return row_of_slot, group_of_tile, slot_of_row


def _tiles(x, row_of_slot, tile_rows: int):
    """x [T, C] -> [NT, tile_rows, C], zero in slots that hold no row."""
    picked = jnp.take(x, row_of_slot, axis=0, mode="fill", fill_value=0)
    return picked.reshape(-1, tile_rows, x.shape[1])


def _accumulation(dtype) -> dict:
    """einsum arguments: int8 products accumulate in int32 (quantized experts), floats in
    float32 at full precision."""
    if jnp.issubdtype(dtype, jnp.integer):
        return dict(preferred_element_type=jnp.int32)
    return dict(precision=_HIGHEST, preferred_element_type=jnp.float32)


def _tile_weights(rhs, group_of_tile):
    """rhs[group_of_tile]: [NT, ...] weights, one per tile. Few tiles (decode) take one dynamic
    slice each: the same reads as a gather, but XLA's cost model charges a gather fused into a
    copy the whole [G, ...] operand, and a dynamic slice only what it reads."""
    if group_of_tile.shape[0] > _MAX_SLICED_TILES:
        return rhs.at[group_of_tile].get(mode="promise_in_bounds")
    return jnp.stack([jax.lax.dynamic_index_in_dim(rhs, group_of_tile[i], keepdims=False)
                      for i in range(group_of_tile.shape[0])])


def _config(config, lhs, n_dim: int, num_groups: int, kind: str) -> Config:
    return config or default_config(lhs.shape[0], lhs.shape[1], n_dim, num_groups, lhs.dtype,
                                    kind)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None, config=None):
    """lhs [T, K] x rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [T, N] in out_dtype."""
    out_dtype = lhs.dtype if out_dtype is None else out_dtype
    check(lhs, rhs, out_dtype=out_dtype, config=config)
    config = _config(config, lhs, rhs.shape[1 if transpose_rhs else 2], rhs.shape[0], "gmm")
    t = config.tile_rows
    if config.loop:
        return _gmm_loop(lhs, rhs, group_sizes, t, transpose_rhs, out_dtype)
    row_of_slot, group_of_tile, slot_of_row = _layout(group_sizes, lhs.shape[0], t)
    x_ptk = _tiles(lhs, row_of_slot, t)
    group_of_tile = jnp.minimum(group_of_tile, rhs.shape[0] - 1)  # unused tiles hold zeros
    spec = "PtK,PNK->PtN" if transpose_rhs else "PtK,PKN->PtN"
    y_ptn = jnp.einsum(spec, x_ptk, _tile_weights(rhs, group_of_tile), **_accumulation(lhs.dtype))
    y = y_ptn.reshape(-1, y_ptn.shape[-1])
    return jnp.take(y, slot_of_row, axis=0, mode="fill", fill_value=0).astype(out_dtype)


def tgmm(lhs, rhs, group_sizes, *, out_dtype=None, config=None):
    """lhs [T, K], rhs [T, N] -> [G, K, N] in out_dtype: per-group lhs^T @ rhs."""
    out_dtype = lhs.dtype if out_dtype is None else out_dtype
    check(lhs, rhs, out_dtype=out_dtype, config=config)
    g = group_sizes.shape[0]
    config = _config(config, lhs, rhs.shape[1], g, "tgmm")
    t = config.tile_rows
    if config.loop:
        return _tgmm_loop(lhs, rhs, group_sizes, t, out_dtype)
    row_of_slot, group_of_tile, _ = _layout(group_sizes, lhs.shape[0], t)
    x_ptk, dy_ptn = _tiles(lhs, row_of_slot, t), _tiles(rhs, row_of_slot, t)
    partial_pkn = jnp.einsum("PtK,PtN->PKN", x_ptk, dy_ptn, **_accumulation(lhs.dtype))
    # Tiles past the used ones (group index G) are dropped; an empty group sums to 0.
    out = jax.ops.segment_sum(partial_pkn, group_of_tile, num_segments=g,
                              indices_are_sorted=True)
    return out.astype(out_dtype)


# ------------------------------------------------------------------------------ the loop form
def _windows(group_sizes, num_rows: int, tile_rows: int):
    """The loop form's tiles, read in place from the sorted rows: group g's rows in windows of
    tile_rows rows from its first row (the batched form's used tiles, without the padded copy).
    Returns (starts [G], ends [G], window_ends [G]: cumulative window counts, count)."""
    ends = jnp.minimum(jnp.cumsum(group_sizes), num_rows)  # a sum past T is clipped to T
    starts = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])
    window_ends = jnp.cumsum((ends - starts + tile_rows - 1) // tile_rows)
    return starts, ends, window_ends, window_ends[-1]


def _window(i, windows, num_rows: int, tile_rows: int):
    """Window i: (its group, first row of the tile_rows rows read, which of them it owns). The
    read is shifted back to fit when a window ends within tile_rows of the last row."""
    starts, ends, window_ends, _ = windows
    g = jnp.sum(i >= window_ends)
    counts = jnp.diff(window_ends, prepend=jnp.zeros((1,), window_ends.dtype))
    first = starts[g] + (i - (window_ends[g] - counts[g])) * tile_rows
    last = jnp.minimum(first + tile_rows, ends[g])
    at = jnp.minimum(first, num_rows - tile_rows)
    rows = at + jnp.arange(tile_rows)
    return g, at, (rows >= first) & (rows < last)


def _zeros_tied(shape, dtype, lhs, rhs):
    """Zeros that depend on lhs and rhs, so that inside shard_map the loop's carry varies over
    the same mesh axes as what the loop body adds to it (while needs equal carry types)."""
    tie = lhs.reshape(-1)[0].astype(dtype) * rhs.reshape(-1)[0].astype(dtype)
    return jnp.broadcast_to(jax.lax.select(jnp.zeros((), bool), tie, jnp.zeros((), dtype)), shape)


def _gmm_loop(lhs, rhs, group_sizes, tile_rows: int, transpose_rhs: bool, out_dtype):
    """gmm one window per step of a while loop over the used windows only: each reads its rows
    and its group's weight in place and writes back the rows it owns (no [tiles, K, N] weight
    copy, no padded row buffer; rows of no group, e.g. zero-expert slots, are never visited)."""
    num_rows = lhs.shape[0]
    t = min(tile_rows, num_rows)
    windows = _windows(group_sizes, num_rows, t)
    spec = "tK,NK->tN" if transpose_rhs else "tK,KN->tN"
    acc = _accumulation(lhs.dtype)

    def step(i, out):
        g, at, own = _window(i, windows, num_rows, t)
        x = jax.lax.dynamic_slice_in_dim(lhs, at, t)
        w = jax.lax.dynamic_index_in_dim(rhs, g, keepdims=False)
        y = jnp.einsum(spec, x, w, **acc).astype(out_dtype)
        kept = jax.lax.dynamic_slice_in_dim(out, at, t)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(own[:, None], y, kept), at, 0)

    n_dim = rhs.shape[1 if transpose_rhs else 2]
    return jax.lax.fori_loop(0, windows[3], step,
                             _zeros_tied((num_rows, n_dim), out_dtype, lhs, rhs))


def _tgmm_loop(lhs, rhs, group_sizes, tile_rows: int, out_dtype):
    """tgmm one window per step (as _gmm_loop): its rows' lhs^T @ rhs added to its group."""
    num_rows = lhs.shape[0]
    t = min(tile_rows, num_rows)
    windows = _windows(group_sizes, num_rows, t)
    acc = _accumulation(lhs.dtype)

    def step(i, out_gkn):
        g, at, own = _window(i, windows, num_rows, t)
        # Rows the window does not own (a neighbouring group's) are zeroed on both sides.
        x = jnp.where(own[:, None], jax.lax.dynamic_slice_in_dim(lhs, at, t), 0)
        dy = jnp.where(own[:, None], jax.lax.dynamic_slice_in_dim(rhs, at, t), 0)
        part = jnp.einsum("tK,tN->KN", x, dy, **acc)
        current = jax.lax.dynamic_index_in_dim(out_gkn, g, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(out_gkn, current + part, g, 0)

    shape = (group_sizes.shape[0], lhs.shape[1], rhs.shape[1])
    out = jax.lax.fori_loop(0, windows[3], step,
                            _zeros_tied(shape, acc["preferred_element_type"], lhs, rhs))
    return out.astype(out_dtype)
