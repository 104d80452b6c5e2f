"""The fault drill end to end at its smallest: two interrupts, resume, every check passes."""

import pytest

from . import load_script


@pytest.mark.slow  # five cold training processes
def test_a_small_drill_passes_every_check(tmp_path):
    drill = load_script("fault_drill")
    stats = drill.drill(interrupts=2, steps=4, seed=3, work=tmp_path, log=lambda _: None)
    assert stats["interrupts"] == 2 and stats["survived"] == 2
    assert stats["resumes_exact"] == stats["trials"] >= 1
    assert stats["non_finite_checkpoints"] == 0 and stats["checkpoints_checked"] > 0
    assert stats["orphans"] == 0 and stats["unexpected_exit_codes"] == 0
    assert stats["diverging_run_exit"] == 2 and "non-finite" in stats["diverging_run_message"]
