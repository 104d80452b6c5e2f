"""Layouts: spec formulas, allowed == to_dense == block_metadata, hashing, validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.contract import spec_allowed


def random_layout(rng: np.random.Generator, depth: int = 0) -> masks.Layout:
    kind = rng.integers(0, 7 if depth == 0 else 5)
    if kind == 0:
        return masks.CausalLayout()
    if kind == 1:
        return masks.FullLayout()
    if kind == 2:
        return masks.SlidingWindowLayout(int(rng.integers(1, 20)))
    if kind == 3:
        return masks.LozaLayout(int(rng.integers(1, 9)), int(rng.integers(0, 3)),
                                int(rng.integers(1, 4)))
    if kind == 4:
        shape = rng.integers(1, 8, 2)
        return masks.BlockMaskLayout(rng.random(shape) < 0.5, int(rng.integers(1, 9)))
    pair = (random_layout(rng, depth + 1), random_layout(rng, depth + 1))
    return pair[0] & pair[1] if kind == 5 else pair[0] | pair[1]


def expected_states(dense: np.ndarray, block_q: int, block_k: int) -> np.ndarray:
    q_len, kv_len = dense.shape
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    out = np.zeros((nq, nk), np.int8)
    for i in range(nq):
        for j in range(nk):
            blk = dense[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k]
            k_in_bounds = (j + 1) * block_k <= kv_len
            out[i, j] = (masks.EMPTY if not blk.any()
                         else masks.FULL if blk.all() and k_in_bounds else masks.PARTIAL)
    return out


def test_to_dense_matches_spec_and_allowed_on_random_layouts():
    rng = np.random.default_rng(0)
    for _ in range(40):
        layout = random_layout(rng)
        q_len, kv_len, offset = (int(x) for x in rng.integers(1, 50, 3))
        dense = layout.to_dense(q_len, kv_len, q_offset=offset)
        q = np.arange(q_len)[:, None] + offset
        k = np.arange(kv_len)[None, :]
        np.testing.assert_array_equal(dense, spec_allowed(layout, q, k), err_msg=repr(layout))
        # One fixed jnp shape, sliced afterwards: eager ops compile once per shape.
        on_grid = layout.allowed(jnp.arange(50)[:, None] + offset, jnp.arange(50)[None, :])
        np.testing.assert_array_equal(dense, np.asarray(on_grid)[:q_len, :kv_len],
                                      err_msg=repr(layout))


def test_allowed_on_scattered_positions_and_empty_slots():
    rng = np.random.default_rng(1)
    for _ in range(20):
        layout = random_layout(rng)
        q = rng.integers(0, 60, (3, 5, 1))
        k = rng.integers(-3, 60, (3, 1, 7))  # negative = empty cache slot
        got = np.asarray(layout.allowed(jnp.asarray(q, jnp.int32), jnp.asarray(k, jnp.int32)))
        np.testing.assert_array_equal(got, spec_allowed(layout, q, k), err_msg=repr(layout))
        assert not got[np.broadcast_to(k < 0, got.shape)].any()


def test_allowed_traces_under_jit():
    layout = masks.LozaLayout(4, 1, 2)
    q = jnp.array([[9], [30]], jnp.int32)
    k = jnp.array([[0, 3, 4, 7, 8, 9, 29, -1]], jnp.int32)
    got = jax.jit(layout.allowed)(q, k)
    np.testing.assert_array_equal(np.asarray(got), spec_allowed(layout, np.asarray(q),
                                                               np.asarray(k)))


def test_block_metadata_matches_dense_on_random_layouts():
    rng = np.random.default_rng(2)
    for _ in range(60):
        layout = random_layout(rng)
        q_len, kv_len = (int(x) for x in rng.integers(1, 70, 2))
        block_q, block_k = (int(x) for x in rng.integers(1, 17, 2))
        offset = int(rng.integers(0, 30))
        meta = layout.block_metadata(q_len, kv_len, block_q, block_k, q_offset=offset)
        want = expected_states(layout.to_dense(q_len, kv_len, q_offset=offset), block_q, block_k)
        np.testing.assert_array_equal(meta.block_state, want, err_msg=repr(layout))
        # The compacted lists are exactly the non-empty blocks, in order, padded with the last.
        for i in range(meta.num_q_blocks):
            n = meta.num_active[i]
            active = np.flatnonzero(want[i] != masks.EMPTY)
            np.testing.assert_array_equal(meta.active_kv_blocks[i, :n], active)
            pad = active[-1] if n else 0
            assert np.all(meta.active_kv_blocks[i, n:] == pad)
            np.testing.assert_array_equal(meta.active_is_full[i, :n], want[i, active] == masks.FULL)
            assert not meta.active_is_full[i, n:].any()
        assert meta.max_active == max(1, int(meta.num_active.max()))


def test_loza_1100_tokens_matches_spec_formula():
    layout = masks.LozaLayout()  # block 128, 1 sink, 7 local
    q, k = np.arange(1100)[:, None], np.arange(1100)[None, :]
    spec = (k <= q) & ((k // 128 < 1) | (k // 128 >= q // 128 - 6))  # §4, verbatim
    np.testing.assert_array_equal(layout.to_dense(1100, 1100), spec)
    assert spec[1023].sum() == 1024 and spec[1024].sum() == 128 + 768 + 1
    # Shorter than 8 blocks: fully causal.
    np.testing.assert_array_equal(layout.to_dense(1024, 1024), np.tril(np.ones((1024, 1024), bool)))
    # Only the last query block loses a key block (block 1).
    meta = layout.block_metadata(1100, 1100, 128, 128)
    assert list(meta.active_kv_blocks[8, :meta.num_active[8]]) == [0, 2, 3, 4, 5, 6, 7, 8]


def test_loza_work_scales_with_density():
    meta = masks.LozaLayout().block_metadata(32768, 32768, 128, 128)
    assert meta.max_active == 8 and meta.num_active.max() == 8
    assert meta.density < 8 / 256 + 1e-9
    # Per query block: sink and local blocks below the diagonal are full, the diagonal partial.
    row = meta.block_state[100]
    assert row[0] == masks.FULL and all(row[94:100] == masks.FULL) and row[100] == masks.PARTIAL
    assert not row[1:94].any() and not row[101:].any()


def test_composite_and_blockmask_bounds_are_exact_for_kernel_sized_blocks():
    window = masks.CausalLayout() & masks.SlidingWindowLayout(256)
    meta = window.block_metadata(1024, 1024, 128, 128)
    np.testing.assert_array_equal(meta.num_active, [1, 2, 3, 3, 3, 3, 3, 3])
    table = np.eye(4, dtype=bool) | np.eye(4, k=-2, dtype=bool)
    meta = masks.BlockMaskLayout(table, 64).block_metadata(256, 256, 32, 32)
    np.testing.assert_array_equal(meta.block_state,
                                  expected_states(masks.BlockMaskLayout(table, 64)
                                                  .to_dense(256, 256), 32, 32))


def test_layouts_are_frozen_hashable_and_compose():
    assert masks.LozaLayout() == masks.LozaLayout(128, 1, 7)
    assert hash(masks.SlidingWindowLayout(4)) == hash(masks.SlidingWindowLayout(4))
    table = ((True, False), (True, True))
    assert masks.BlockMaskLayout(table, 8) == masks.BlockMaskLayout(np.array(table), 8)
    both = masks.CausalLayout() & masks.SlidingWindowLayout(4) & masks.FullLayout()
    assert both == masks.AndLayout((masks.CausalLayout(), masks.SlidingWindowLayout(4),
                                    masks.FullLayout()))
    assert len({both, masks.CausalLayout(), masks.CausalLayout() | masks.FullLayout()}) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        masks.LozaLayout().block_size = 64
    # Hashable layouts can be static arguments of jit.
    f = jax.jit(lambda q, layout: layout.allowed(q, jnp.arange(4)), static_argnums=1)
    assert np.asarray(f(jnp.int32(1), masks.CausalLayout())).tolist() == [True, True, False, False]
    # Block metadata is cached per (layout, sizes) and read-only.
    meta = masks.LozaLayout().block_metadata(512, 512, 64, 64)
    assert meta is masks.LozaLayout().block_metadata(512, 512, 64, 64)
    with pytest.raises(ValueError):
        meta.num_active[0] = 3


@pytest.mark.parametrize("build, message", [
    (lambda: masks.SlidingWindowLayout(0), "window=0"),
    (lambda: masks.LozaLayout(block_size=0), "block_size=0"),
    (lambda: masks.LozaLayout(sink_blocks=-1), "sink_blocks=-1"),
    (lambda: masks.LozaLayout(local_blocks=0), "local_blocks=0"),
    (lambda: masks.BlockMaskLayout(((1, 0),), 4), "bool"),
    (lambda: masks.BlockMaskLayout((), 4), "bool"),
    (lambda: masks.AndLayout(()), "non-empty"),
    (lambda: masks.CausalLayout().to_dense(0, 4), "q_len=0"),
    (lambda: masks.CausalLayout().block_metadata(8, 8, 4, 0), "block_k=0"),
    (lambda: masks.CausalLayout().allowed(jnp.zeros(2), jnp.zeros(2, jnp.int32)), "integer"),
])
def test_invalid_layouts_raise_naming_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_composing_a_non_layout_fails():
    # TypeError when the jaxtyping/beartype import hook checks the annotation first.
    with pytest.raises((ValueError, TypeError)):
        masks.AndLayout(("causal",))
