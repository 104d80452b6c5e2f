"""Packing trajectories into learner rows: layout against a direct construction."""

import numpy as np
import pytest

from lcjax.rl.learner import build_batch, empty_batch, row_buckets


def _traj(n, gen_from, adv, seed):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(3, 50, n).tolist(), "gen_mask": [i >= gen_from for i in range(n)],
            "logprobs": [-(i + 1.0) if i >= gen_from else 0.0 for i in range(n)], "advantage": adv}


def test_first_fit_packing_layout():
    trajs = [_traj(10, 6, 1.0, 0), _traj(7, 4, -0.5, 1), _traj(12, 9, 2.0, 2), _traj(5, 2, 0.25, 3),
             _traj(4, 1, 0.5, 4)]
    b = build_batch(trajs, max_rows=8, max_len=16)
    assert b.tokens.shape == (4, 16) and float(b.num_sequences) == 5
    # first fit decreasing: [12] -> row 0, [10] -> row 1, [7] -> row 2 (17 > 16), [5] -> row 1
    # (15 <= 16), [4] -> row 0 (16 <= 16); in the given order (10, 7, 12, 5, 4):
    placed = [(1, 0), (2, 0), (0, 0), (1, 10), (0, 12)]
    for t, (row, start) in zip(trajs, placed):
        n = len(t["tokens"])
        np.testing.assert_array_equal(b.tokens[row, start: start + n], t["tokens"])
        np.testing.assert_array_equal(b.positions[row, start: start + n], np.arange(n))
        assert len(set(b.segment_ids[row, start: start + n])) == 1
        np.testing.assert_array_equal(b.mask[row, start: start + n - 1], t["gen_mask"][1:])
        np.testing.assert_array_equal(b.logp_rollout[row, start: start + n - 1], t["logprobs"][1:])
        assert (b.advantages[row, start: start + n - 1] == t["advantage"]).all()
    assert (b.segment_ids[0, 0], b.segment_ids[0, 12], b.segment_ids[1, 10]) == (1, 2, 2)
    # the target that crosses into the next trajectory is never trained
    assert b.mask[1, 9] == 0 and b.mask.sum() == sum(sum(t["gen_mask"][1:]) for t in trajs)
    assert (b.segment_ids[3] == 0).all() and (b.mask[3] == 0).all()  # padding row


def test_buckets_and_errors():
    assert row_buckets(64) == [4, 6, 8, 12, 16, 24, 32, 48, 64] and row_buckets(3) == [3]
    assert row_buckets(10) == [4, 6, 8, 10] and row_buckets(12) == [4, 6, 8, 12]
    assert empty_batch(8, 16).tokens.shape == (8, 16)
    with pytest.raises(ValueError, match="max_len"):
        build_batch([_traj(20, 1, 0.0, 0)], 4, 16)
    with pytest.raises(ValueError, match="max_rows"):
        build_batch([_traj(10, 1, 0.0, i) for i in range(5)], 4, 16)
