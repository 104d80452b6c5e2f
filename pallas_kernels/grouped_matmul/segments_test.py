"""segments backend: the contract at two tile sizes, its tile layout and tile-size heuristic, and
XLA's cost analysis of it (useful FLOPs only at training shapes, routed weights only at decode)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import api, reference, segments
from pallas_kernels.grouped_matmul.gmm_contract import GmmContract


class TestSegmentsTiles16(GmmContract):
    """Tiles of 16 rows: groups start inside and end inside tiles, empty groups take none."""

    implementation = "segments"
    config = segments.Config(tile_rows=16)


class TestSegmentsRowByRow(GmmContract):
    """tile_rows=1, the decode layout: every row gathers its own group's weight."""

    implementation = "segments"
    config = segments.Config(tile_rows=1)


class TestSegmentsLoop(GmmContract):
    """The same tiles run one by one in a while loop, rows and weights read in place."""

    implementation = "segments"
    config = segments.Config(tile_rows=16, loop=True)


@pytest.mark.parametrize("tile_rows", [1, 3, 16])
def test_layout_places_every_row_once_at_a_tile_aligned_group_start(tile_rows):
    """Against a numpy walk over the groups, for random splits (empty groups, sums past T)."""
    rng = np.random.default_rng(tile_rows)
    rows, groups = 50, 7
    for _ in range(20):
        sizes = rng.multinomial(rng.integers(0, 70), rng.dirichlet(np.full(groups, 0.3)))
        row_of_slot, group_of_tile, slot_of_row = map(np.asarray, segments._layout(
            jnp.asarray(sizes, jnp.int32), rows, tile_rows))
        nt = segments.num_tiles(rows, groups, tile_rows)
        want_slot_of_row = np.full(rows, nt * tile_rows)
        want_group_of_tile = np.full(nt, groups)
        row = tile = 0
        for g, size in enumerate(sizes):
            size = min(size, rows - row)
            for i in range(size):
                want_slot_of_row[row + i] = tile * tile_rows + i
            used = -(-size // tile_rows)
            want_group_of_tile[tile:tile + used] = g
            row, tile = row + size, tile + used
        assert tile <= nt  # the static bound holds
        np.testing.assert_array_equal(slot_of_row, want_slot_of_row)
        np.testing.assert_array_equal(group_of_tile, want_group_of_tile)
        placed = slot_of_row < nt * tile_rows
        np.testing.assert_array_equal(row_of_slot[slot_of_row[placed]], np.arange(rows)[placed])
        assert np.sum(row_of_slot < rows) == np.sum(placed)


def test_tile_heuristic_decode_copies_few_weights_training_pads_little():
    assert segments.default_config(4, 512, 256, 32, jnp.float32).tile_rows == 1  # batch 1, top 4
    # Batch 16: wider tiles copy fewer weights than one per row (and than 1-row tiles would).
    t = segments.default_config(64, 512, 256, 32, jnp.float32).tile_rows
    assert segments.num_tiles(64, 32, t) < 40 < segments.num_tiles(64, 32, 1)
    for rows, groups in ((8192, 32), (16384, 64), (49152, 512)):
        t = segments.default_config(rows, 2048, 1024, groups, jnp.bfloat16).tile_rows
        assert t >= 16 and segments.padding_factor(rows, groups, t) <= segments._MAX_PADDING
    assert segments.padding_factor(8192, 32, 1) == 1.0
    with pytest.raises(ValueError, match="tile_rows=0 must be a positive int"):
        segments.Config(tile_rows=0)


def test_loop_runs_the_batched_forms_used_tiles_one_per_step():
    """The loop form does the batched form's FLOPs on its used tiles: a while loop whose trip
    count is the number of used tiles (sum of ceil(group size / tile_rows)), each step one
    [tile_rows, K] x [K, N] product read in place (no padded copy of the rows)."""
    rows, groups, k, n = 8192, 32, 64, 32
    config = segments.default_config(rows, k, n, groups, jnp.float32)
    assert config.loop == (jax.default_backend() == "cpu")
    config = segments.Config(config.tile_rows, loop=True)
    jaxpr = jax.make_jaxpr(lambda a, b, s: segments.gmm(a, b, s, config=config))(
        jnp.zeros((rows, k)), jnp.zeros((groups, k, n)), jnp.zeros((groups,), jnp.int32))
    (loop,) = [e for e in jaxpr.jaxpr.eqns if str(e.primitive) == "while"]
    assert not [e for e in jaxpr.jaxpr.eqns if str(e.primitive) in ("gather", "dot_general")]
    dots = [e for e in loop.params["body_jaxpr"].jaxpr.eqns if str(e.primitive) == "dot_general"]
    assert [tuple(e.invars[0].aval.shape) + tuple(e.outvars[0].aval.shape) for e in dots] == [
        (config.tile_rows, k, config.tile_rows, n)]
    t = 4
    sizes = jnp.asarray([7, 0, 20, 3, 9], jnp.int32)
    windows = segments._windows(sizes, 96, t)
    assert int(windows[3]) == 2 + 0 + 5 + 1 + 3  # the batched form's used tiles
    owned = np.zeros(96, int)
    for i in range(int(windows[3])):
        g, at, own = segments._window(i, windows, 96, t)
        rows_i = int(at) + np.flatnonzero(np.asarray(own))
        owned[rows_i] += 1
        ends = np.cumsum(np.asarray(sizes))
        assert np.all((rows_i >= ends[int(g)] - int(sizes[int(g)])) & (rows_i < ends[int(g)]))
    np.testing.assert_array_equal(owned, (np.arange(96) < 39).astype(int))  # each row once


def test_loop_skips_tiles_of_no_group_and_matches_the_batched_form():
    """Rows past sum(group_sizes) (zero-expert slots) give 0 and no gradient in both forms."""
    rng = np.random.default_rng(3)
    rows, groups, k, n, t = 96, 5, 16, 12, 8
    lhs = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(groups, k, n)), jnp.float32)
    sizes = jnp.asarray([7, 0, 20, 3, 9], jnp.int32)  # 39 of 96 rows used: most tiles skipped
    d_out = jnp.asarray(rng.normal(size=(rows, n)), jnp.float32)
    got = {loop: (segments.gmm(lhs, rhs, sizes, config=segments.Config(t, loop=loop)),
                  segments.tgmm(lhs, d_out, sizes, config=segments.Config(t, loop=loop)))
           for loop in (False, True)}
    want_out = reference.gmm_numpy(lhs, rhs, sizes)
    want_d_rhs = reference.tgmm_numpy(lhs, d_out, sizes)
    for out, d_rhs in got.values():
        np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d_rhs, want_d_rhs, rtol=1e-5, atol=1e-5)
        assert not np.asarray(out[39:]).any()


def test_default_order_on_cpu_is_segments_then_ragged_dot():
    assert api.default_order("cpu") == ("segments", "xla")
    for platform in ("gpu", "tpu"):
        assert api.default_order(platform)[-2:] == ("segments", "xla")


def _cost(fn, *shapes):
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    return jax.jit(fn).lower(*args).compile().cost_analysis()


@pytest.mark.parametrize("implementation, within", [("segments", True), ("xla", False)])
def test_training_shape_costs_at_most_1_2x_the_useful_flops(implementation, within):
    """Forward and both gradients at 2,048 tokens x top-4 over 32 experts; ragged_dot does not."""
    rows, groups, k, n = 8192, 32, 64, 32

    config = None if implementation == "xla" else dataclasses.replace(
        segments.default_config(rows, k, n, groups, jnp.float32), loop=False)

    def fwd_bwd(lhs, rhs, sizes, d_out):
        out, vjp = jax.vjp(lambda a, b: api.gmm(a, b, sizes, implementation=implementation,
                                                config=config), lhs, rhs)
        return out, vjp(d_out)

    cost = _cost(fwd_bwd, ((rows, k), jnp.float32), ((groups, k, n), jnp.float32),
                 ((groups,), jnp.int32), ((rows, n), jnp.float32))
    ratio = cost["flops"] / (3 * 2 * rows * k * n)
    assert (ratio <= 1.2) == within, ratio


def test_decode_reads_only_the_routed_weights():
    """4 rows (batch 1, top 4) against 32 experts: bytes accessed are those of 4 experts'
    weights read, copied into tiles and read again (12 of 32); ragged_dot reads all 32."""
    rows, groups, k, n = 4, 32, 256, 128
    shapes = (((rows, k), jnp.float32), ((groups, k, n), jnp.float32), ((groups,), jnp.int32))
    expert_bytes = k * n * 4
    ours = _cost(lambda a, b, s: api.gmm(a, b, s), *shapes)["bytes accessed"]
    ragged = _cost(lambda a, b, s: api.gmm(a, b, s, implementation="xla"),
                   *shapes)["bytes accessed"]
    assert ours <= 3.5 * rows * expert_bytes < groups * expert_bytes <= ragged, (ours, ragged)
