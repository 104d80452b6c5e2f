"""Tile maps computed on device from `group_sizes`: which rows each kernel program works on.

Rows are sorted by group: group g owns rows [offsets[g], offsets[g+1]). Rows past the last group
(offsets[G] .. T-1, the MoE's zero-expert slots) form a "tail" with no weight: gmm writes 0 there.
Ends are clipped to T, so a group_sizes summing past T never reads or writes out of bounds.

Two shapes of map, both static-length (jit-friendly) with a traced count of useful entries:
- `row_tiles` (GPU): tiles start at a group's first row, so a tile never spans two groups and
  each output row is written by exactly one program; up to cdiv(T, bm) + G tiles.
- `tile_visits` (TPU, MegaBlocks style): tiles are bm-aligned and a tile that straddles k group
  boundaries is visited k+1 times, consecutively, each visit masked to its group's rows; output
  blocks are only ever revisited back to back, as Pallas TPU pipelining requires.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Int


def group_offsets(group_sizes: Int[Array, "G"], num_rows: int) -> Int[Array, "G+1"]:
    """[0, end_0, end_1, ...] with every end clipped to num_rows (int32)."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends.astype(jnp.int32)])


def max_row_tiles(num_rows: int, num_groups: int, block_m: int) -> int:
    """Upper bound on `row_tiles` entries. Each of the G+1 row ranges (groups and tail) adds at
    most one partial tile; when all of them do, their remainders sum to a multiple of block_m, so
    the total is at most cdiv(T, bm) + G."""
    return -(-num_rows // block_m) + num_groups


class RowTiles(NamedTuple):
    """int32 [3, max_row_tiles]: (group, start, end) per tile. The tile covers rows
    [start, min(start + block_m, end)), end being its group's end row; group == G is the tail
    (store zeros) and start == end marks an idle tile."""

    table: Int[Array, "3 tiles"]


def row_tiles(group_sizes: Int[Array, "G"], num_rows: int, block_m: int) -> RowTiles:
    """Group-aligned row tiles for a gmm over num_rows rows (see module docstring)."""
    num_groups = group_sizes.shape[0]
    offsets = group_offsets(group_sizes, num_rows)
    starts = offsets  # [G+1]: groups then the tail
    ends = jnp.concatenate([offsets[1:], jnp.full((1,), num_rows, jnp.int32)])
    tiles_per_range = (ends - starts + block_m - 1) // block_m
    tiles_end = jnp.cumsum(tiles_per_range)
    tile = jnp.arange(max_row_tiles(num_rows, num_groups, block_m), dtype=jnp.int32)
    owner = jnp.searchsorted(tiles_end, tile, side="right").astype(jnp.int32)  # G+1: idle
    range_id = jnp.minimum(owner, num_groups)
    first_tile = (tiles_end - tiles_per_range)[range_id]
    start = starts[range_id] + (tile - first_tile) * block_m
    end = jnp.where(owner <= num_groups, ends[range_id], start)
    start = jnp.where(owner <= num_groups, start, num_rows)
    end = jnp.where(owner <= num_groups, end, num_rows)
    return RowTiles(jnp.stack([range_id, start, end]).astype(jnp.int32))


def max_tile_visits(num_rows: int, num_groups: int, block_m: int, visit_empty: bool) -> int:
    """Upper bound on `tile_visits` entries: every bm-aligned tile once, plus one revisit per
    interior group boundary (G of them with the tail), plus one visit per empty group if asked."""
    return -(-num_rows // block_m) + num_groups + (num_groups if visit_empty else 0)


class TileVisits(NamedTuple):
    group_ids: Int[Array, "V"]  # group of each visit; G is the tail (gmm only)
    m_tile_ids: Int[Array, "V"]  # bm-aligned row tile of each visit, nondecreasing
    offsets: Int[Array, "G+2"]  # row ranges: group g is [offsets[g], offsets[g+1]); G: tail
    num_visits: Int[Array, ""]  # visits in use (the rest repeat the last one)


def tile_visits(group_sizes: Int[Array, "G"], num_rows: int, block_m: int, *,
                with_tail: bool, visit_empty: bool) -> TileVisits:
    """bm-aligned tile visits, ordered by group then tile (see module docstring).

    with_tail: also visit the tiles of the tail rows (gmm zeroes them).
    visit_empty: give each empty group one visit (tgmm must still write its zero block); it lands
      on the tile holding the group's start row, clipped to the last tile.
    """
    num_groups = group_sizes.shape[0]
    offsets = jnp.concatenate([group_offsets(group_sizes, num_rows),
                               jnp.full((1,), num_rows, jnp.int32)])  # [G+2]
    num_ranges = num_groups + 1 if with_tail else num_groups
    starts, ends = offsets[:num_ranges], offsets[1:num_ranges + 1]
    num_m_tiles = -(-num_rows // block_m)
    empty = ends <= starts
    first = jnp.minimum(starts // block_m, num_m_tiles - 1)
    last = jnp.maximum(ends - 1, 0) // block_m
    visits = jnp.where(empty, 1 if visit_empty else 0, last - first + 1)
    if with_tail:  # an empty tail needs no visit: nothing to zero
        visits = visits.at[num_groups].set(jnp.where(empty[num_groups], 0, visits[num_groups]))
    visits_end = jnp.cumsum(visits)
    size = max_tile_visits(num_rows, num_groups, block_m, visit_empty)
    num_visits = visits_end[-1]
    # Unused trailing entries repeat the last real visit, so their block indices are valid.
    v = jnp.minimum(jnp.arange(size, dtype=jnp.int32), jnp.maximum(num_visits - 1, 0))
    group = jnp.minimum(jnp.searchsorted(visits_end, v, side="right"), num_ranges - 1)
    m_tile = first[group] + (v - (visits_end - visits)[group])
    return TileVisits(group.astype(jnp.int32), m_tile.astype(jnp.int32), offsets,
                      num_visits.astype(jnp.int32))

