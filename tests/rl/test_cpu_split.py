"""Host cores split between the rollout and a learner process: the spec's parsing and checks,
and pinning every thread of a process and giving the masks back."""

import os
import threading

import pytest

from lcjax.rl.config import LearnerConfig
from lcjax.rl.cpu_split import parse_cpus, pin_process, split_cpus, unpin_process


def test_parse_and_bad_specs_name_the_value():
    assert parse_cpus("2-3,6") == {2, 3, 6}
    assert parse_cpus("1") == {1}
    assert parse_cpus(" 0 , 4-5") == {0, 4, 5}
    for bad in ("", "x", "3-1", "-1", "1,,2", "1-"):
        with pytest.raises(ValueError, match=f"learner.cpus={bad!r}"):
            parse_cpus(bad)
    with pytest.raises(ValueError, match="learner.cpus='half'"):
        LearnerConfig(cpus="half")
    LearnerConfig(cpus="all"), LearnerConfig(cpus="0-1")


def test_split():
    assert split_cpus("auto", {0, 1}, "cpu") == ({1}, {0})
    assert split_cpus("auto", {0, 1, 2, 3, 4}, "cpu") == ({3, 4}, {0, 1, 2})  # learner: half, down
    assert split_cpus("auto", {0, 1}, "gpu") is None  # the learner's work is on the device
    assert split_cpus("auto", {3}, "cpu") is None  # one core: nothing to split
    assert split_cpus("all", {0, 1}, "cpu") is None
    assert split_cpus("1,3", {0, 1, 2, 3}, "gpu") == ({1, 3}, {0, 2})  # named cores: any backend
    with pytest.raises(ValueError, match=r"cores \[5\] are not available"):
        split_cpus("1,5", {0, 1, 2}, "cpu")
    with pytest.raises(ValueError, match="takes every core"):
        split_cpus("0-1", {0, 1}, "cpu")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux CPU affinity and two cores")
def test_pin_every_thread_and_give_the_masks_back():
    available = os.sched_getaffinity(0)
    one = {min(available)}
    stop = threading.Event()
    early = threading.Thread(target=stop.wait)
    early.start()
    before = pin_process(one)
    try:
        late_mask = []
        late = threading.Thread(target=lambda: late_mask.append(os.sched_getaffinity(0)))
        late.start()
        late.join()
        assert late_mask == [one]  # a thread started while pinned inherits the mask
        assert os.sched_getaffinity(early.native_id) == one
        assert os.sched_getaffinity(0) == one
    finally:
        unpin_process(before, available)
        stop.set()
        early.join()
    assert os.sched_getaffinity(0) == available
