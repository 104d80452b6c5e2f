"""Tile maps: every row owned by exactly one tile (GPU) / one visit (TPU), within bounds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import metadata
from pallas_kernels.grouped_matmul.gmm_contract import COMPILER_OPTIONS

# (rows, groups, block_m): a few shapes (each compiles once), many random group sizes each.
SHAPES = ((1, 1, 8), (77, 3, 16), (250, 11, 8))
SEEDS = range(16)
_jit = functools.partial(jax.jit, static_argnums=(1, 2), compiler_options=COMPILER_OPTIONS)
row_tiles = _jit(metadata.row_tiles)
tile_visits = _jit(metadata.tile_visits, static_argnames=("with_tail", "visit_empty"))


def _case(seed):
    rng = np.random.default_rng(seed)
    num_rows, num_groups, block_m = SHAPES[seed % len(SHAPES)]
    return num_rows, num_groups, block_m, _random_sizes(rng, num_rows, num_groups)


def _random_sizes(rng, num_rows, num_groups):
    """Group sizes with empty groups, a random tail, and sometimes a sum past num_rows."""
    weights = rng.random(num_groups) ** 3 * (rng.random(num_groups) < 0.7)
    total = int(rng.integers(0, num_rows + num_rows // 4 + 1))
    sizes = np.floor(weights / max(weights.sum(), 1e-9) * total).astype(np.int32)
    return sizes


def _ranges(sizes, num_rows):
    ends = np.minimum(np.cumsum(sizes), num_rows)
    starts = np.concatenate([[0], ends[:-1]])
    return starts, ends


@pytest.mark.parametrize("seed", SEEDS)
def test_row_tiles_partition_the_rows(seed):
    num_rows, num_groups, block_m, sizes = _case(seed)
    group, start, end = np.asarray(row_tiles(jnp.asarray(sizes), num_rows, block_m).table)
    assert len(group) == metadata.max_row_tiles(num_rows, num_groups, block_m)
    starts, ends = _ranges(sizes, num_rows)
    owner = np.full(num_rows, -1)
    for g, s, e in zip(group, start, end):
        if s == e:
            continue  # idle
        assert 0 <= s < e <= num_rows
        e = min(s + block_m, e)  # `end` is the range's end; the tile stops block_m rows on
        if g < num_groups:
            assert starts[g] <= s and e <= ends[g], "a tile spans two groups"
        else:
            assert g == num_groups and s >= ends[-1], "tail tile before the last group's end"
        assert np.all(owner[s:e] == -1), "row written twice"
        owner[s:e] = g
    assert np.all(owner >= 0), "row written by no tile"
    want = np.full(num_rows, num_groups)
    for g in range(num_groups):
        want[starts[g]:ends[g]] = g
    np.testing.assert_array_equal(owner, want)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_tail, visit_empty", [(True, False), (False, True)])
def test_tile_visits_cover_each_row_once_in_order(seed, with_tail, visit_empty):
    num_rows, num_groups, block_m, sizes = _case(seed)
    visits = tile_visits(jnp.asarray(sizes), num_rows, block_m, with_tail=with_tail,
                                  visit_empty=visit_empty)
    n = int(visits.num_visits)
    group, m_tile = np.asarray(visits.group_ids), np.asarray(visits.m_tile_ids)
    offsets = np.asarray(visits.offsets)
    assert len(group) == metadata.max_tile_visits(num_rows, num_groups, block_m, visit_empty)
    assert n <= len(group)
    starts, ends = _ranges(sizes, num_rows)
    np.testing.assert_array_equal(offsets[:num_groups + 1], np.concatenate([[0], ends]))
    assert offsets[-1] == num_rows
    num_m_tiles = -(-num_rows // block_m)
    assert np.all((0 <= m_tile) & (m_tile < num_m_tiles))
    assert np.all(np.diff(m_tile[:n]) >= 0), "output tiles revisited out of order"
    assert np.all(np.diff(group[:n]) >= 0), "groups visited out of order"
    count = np.zeros(num_rows, int)
    for g, t in zip(group[:n], m_tile[:n]):
        rows = np.arange(t * block_m, min((t + 1) * block_m, num_rows))
        count[rows[(rows >= offsets[g]) & (rows < offsets[g + 1])]] += 1
    covered = count if with_tail else count[:ends[-1]]
    assert np.all(covered == 1)
    if visit_empty:  # tgmm stores every group's block, empty or not
        assert set(group[:n]) == set(range(num_groups))
    else:  # gmm never visits empty groups
        assert all(sizes[g] > 0 and starts[g] < ends[g] for g in group[:n] if g < num_groups)
