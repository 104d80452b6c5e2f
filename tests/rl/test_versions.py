"""The version window under random long-tailed finish times: staleness bound, no drops, window size."""

import numpy as np
import pytest

from lcjax.rl.versions import VersionWindow


def simulate(staleness, batch, steps, seed, filter_p=0.2):
    """A discrete-time rollout: each tick finishes some running groups (heavy-tailed durations),
    starts as many as admission allows, and runs the learner when ready."""
    rng = np.random.default_rng(seed)
    w = VersionWindow(staleness, batch)
    remaining, started_keep, trained = {}, set(), {}
    tick = 0
    while w.learner_version < steps:
        tick += 1
        assert tick < 100_000, "deadlock"
        while w.can_start():
            g = w.start()
            remaining[g.gid] = int(rng.pareto(1.2) * 3) + 1  # long-tailed
        for gid in list(remaining):
            remaining[gid] -= 1
            if remaining[gid] == 0:
                del remaining[gid]
                keep = rng.uniform() > filter_p
                w.finish(gid, keep)
                if keep:
                    started_keep.add(gid)
        assert len(w.live_versions()) <= staleness + 1
        if w.learner_ready():
            version = w.learner_version
            for gid in w.take_batch():
                trained[gid] = version
            w.publish()
    return w, started_keep, trained


@pytest.mark.parametrize("staleness", [0, 1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_staleness_bound_and_no_drops(staleness, seed):
    w, kept, trained = simulate(staleness, batch=4, steps=60, seed=seed)
    versions = {}
    for g in w.groups.values():
        versions[g.gid] = g.version
    # Every trained group was at most K versions behind (checked inside take_batch too).
    assert len(trained) >= 60 * 4
    trained_counts = np.bincount(list(trained.values()))
    assert trained_counts.min() >= 4 and trained_counts.max() <= w.max_batch
    # Nothing kept was lost: each kept group is trained or still buffered/waiting.
    pending = {g.gid for g in w.groups.values() if g.state == "buffered"}
    assert kept <= set(trained) | pending
    assert w.max_live <= staleness + 1
    if staleness >= 2:
        assert w.max_live >= 2  # the simulation really overlaps versions


def test_trained_version_gaps_use_the_window():
    """With K = 2 some groups are trained 1 or 2 versions late, none 3."""
    rng_gaps = []
    w = VersionWindow(2, 4)
    remaining = {}
    rng = np.random.default_rng(3)
    while w.learner_version < 80:
        while w.can_start():
            remaining[w.start().gid] = int(rng.pareto(1.0) * 3) + 1
        for gid in list(remaining):
            remaining[gid] -= 1
            if remaining[gid] == 0:
                del remaining[gid]
                w.finish(gid, True)
        if w.learner_ready():
            versions = {g.gid: g.version for g in w.groups.values()}
            u = w.learner_version
            rng_gaps += [u - versions[gid] for gid in w.take_batch()]
            w.publish()
    gaps = np.bincount(rng_gaps)
    assert len(gaps) <= 3 and gaps[1] + (gaps[2] if len(gaps) > 2 else 0) > 0


def test_sync_when_staleness_zero():
    w = VersionWindow(0, 2, per_version=2)
    a, b = w.start(), w.start()
    assert not w.can_start()
    w.finish(a.gid, True)
    assert not w.learner_ready()  # b still running on the learner's version
    w.finish(b.gid, True)
    assert w.learner_ready() and sorted(w.take_batch()) == [a.gid, b.gid]
    assert w.publish() == 1 and w.live_versions() == [1]


def test_long_trajectory_holds_the_window():
    """A running group of version 0 blocks the learner at version K until it finishes."""
    w2 = VersionWindow(1, 1, per_version=2)
    slow, fast = w2.start(), w2.start()
    w2.finish(fast.gid, True)
    assert w2.learner_ready()  # u=0, slow is version 0 > 0 - 1
    w2.take_batch(); w2.publish()
    g = w2.start()
    w2.finish(g.gid, True)
    assert not w2.learner_ready() and w2.waiting_on() == {0: 1}
    assert w2.live_versions() == [0, 1]
    w2.finish(slow.gid, True)
    assert w2.learner_ready()
    batch = w2.take_batch()
    assert batch == [slow.gid]  # oldest version first: the long one is trained, not dropped


def test_bad_arguments():
    with pytest.raises(ValueError, match="staleness"):
        VersionWindow(-1, 2)
    with pytest.raises(ValueError, match="groups_per_step"):
        VersionWindow(1, 0)
    with pytest.raises(ValueError, match="per_version"):
        VersionWindow(1, 4, per_version=3)
