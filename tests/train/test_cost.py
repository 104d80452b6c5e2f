"""Executed FLOPs of a train step: loop trip counts from the grouped matmul's loop form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.train.cost import _count_loop_trips, train_step_cost
from pallas_kernels.grouped_matmul import segments


def test_loop_trips_are_the_used_tiles_and_xla_counts_one_body():
    t, k, n = 4, 8, 16
    sizes = jnp.array([5, 0, 9, 2], jnp.int32)  # 18 of 20 rows in groups: tiles 2 + 0 + 3 + 1
    lhs = jax.random.normal(jax.random.key(0), (20, k))
    rhs = jax.random.normal(jax.random.key(1), (4, k, n))
    config = segments.Config(tile_rows=t, loop=True)
    records = []
    with _count_loop_trips(records):
        out = jax.jit(lambda a, b, g: segments.gmm(a, b, g, config=config))(lhs, rhs, sizes)
        jax.effects_barrier()
    assert records == [(6, 2 * t * k * n)]
    # The trip count is what the loop runs: its output equals per-group products.
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for g, (s, size) in enumerate(zip(starts, np.asarray(sizes))):
        np.testing.assert_allclose(out[s:s + size], lhs[s:s + size] @ rhs[g], rtol=1e-5, atol=1e-5)
    # XLA's cost analysis counts the body once: one tile's matmul, whatever the trip count.
    flops = jax.jit(lambda a, b, g: segments.gmm(a, b, g, config=config)).lower(
        lhs, rhs, sizes).compile().cost_analysis()["flops"]
    assert 2 * t * k * n <= flops < 2 * 2 * t * k * n


@pytest.mark.slow  # compiles the unrolled train step (about 30 s)
def test_default_run_executes_useful_flops_mostly():
    config = load_config([resolve_config_path("tiny")], ["data.seq_len=64", "data.global_batch=4"])
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.model.vocab_size, size=(4, 65), dtype=np.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((4, 64), np.float32),
             "segment_ids": np.ones((4, 64), np.int32),
             "positions": np.broadcast_to(np.arange(64, dtype=np.int32), (4, 64)).copy()}
    cost = train_step_cost(config, batch)
    assert cost["grouped_matmul_loops"] == cost["while_loops_in_hlo"] > 0
    # Every loop ran at least once here, so executed FLOPs are at least XLA's count.
    assert cost["executed_flops_per_token"] >= cost["xla_counted_flops"] / 256
    assert 0.3 < cost["useful_fraction"] <= 1.0
