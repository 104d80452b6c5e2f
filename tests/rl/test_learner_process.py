"""The learner in a child process against the in-process learner: the same params, optimizer
state and metrics after the same batches, state round trips, errors reported (not hung), and
no child left behind when the parent dies."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.rl.config import LearnerConfig
from lcjax.rl.learner import Learner, build_batch
from lcjax.rl.learner_process import ProcessLearner
from lcjax.rl.objective import ObjectiveConfig
from lcjax.serve.loading import random_model

T_MAX, ROWS, LEN = 8, 4, 32


@pytest.fixture(scope="module")
def policy():
    return random_model(load_config(resolve_config_path("tiny"),
                                    ["model.num_layers=1", "model.loza.layer_pattern=01"]))


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rows = []
        for _ in range(6):
            k = int(rng.integers(6, 14))
            gen = [False] * 3 + [True] * (k - 3)
            rows.append({"tokens": rng.integers(3, 200, k).tolist(), "gen_mask": gen,
                         "logprobs": [0.0] * 3 + rng.uniform(-4, -0.1, k - 3).tolist(),
                         "advantage": float(rng.normal())})
        out.append(build_batch(rows, ROWS, LEN))
    return out


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two learners compile the update (~40 s on 2 cores); not the default placement
def test_same_updates_as_the_in_process_learner(policy):
    config, variables, _ = policy
    cfg = LearnerConfig(learning_rate=1e-2, updates_per_batch=2)
    local = Learner(config.model, variables, cfg, ObjectiveConfig(), T_MAX)
    remote = ProcessLearner(config.model, variables, cfg, ObjectiveConfig(), T_MAX)
    try:
        remote.warmup(ROWS, LEN)
        for batch in _batches(2):
            want, got = local.step(batch), remote.step(batch)
            assert got.keys() == want.keys()
            np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)],
                                       rtol=1e-4, atol=1e-6)
        assert remote.version == local.version == 2  # one version per batch, 2 updates each
        _close(remote.variables()["params"], local.variables()["params"])
        state = remote.get_state()
        assert int(state.step) == 2 and int(state.opt_state[1][0].count) == 4
        _close(state, local.state)  # Adam moments too
        moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(variables["params"])))
        assert moved > 1e-4

        # a restore: the child adopts the pushed state, params and version follow
        remote.set_state(jax.device_get(local.state.replace(step=np.int32(9))))
        assert remote.version == 9
        batch = _batches(1, seed=5)[0]
        local.step(batch)
        remote.step(batch)
        _close(remote.variables()["params"], local.variables()["params"])

        # an error in the child comes back as an error naming it; the child keeps serving
        bad = batch.replace(mask=np.zeros((ROWS, LEN + 3), np.float32))
        with pytest.raises(RuntimeError, match="learner process failed"):
            remote.step(bad)
        assert remote.version == 10
        remote.step(batch)
        assert remote.version == 11
    finally:
        remote.close()
    assert int(remote.state.step) == 11  # the last state stays readable after close
    with pytest.raises(RuntimeError, match="closed"):
        remote.step(batch)


def test_a_dead_child_is_an_error_not_a_hang(policy):
    config, variables, _ = policy
    available = os.sched_getaffinity(0)
    remote = ProcessLearner(config.model, variables, LearnerConfig(), ObjectiveConfig(), T_MAX)
    if len(available) >= 2 and jax.default_backend() == "cpu":  # learner.cpus=auto splits them
        learner_cpus, rollout_cpus = remote.cpus
        assert learner_cpus | rollout_cpus == available and not learner_cpus & rollout_cpus
        assert os.sched_getaffinity(remote._proc.pid) == learner_cpus
        assert os.sched_getaffinity(0) == rollout_cpus
    os.kill(remote._proc.pid, signal.SIGKILL)
    remote._proc.join(10)
    with pytest.raises(RuntimeError, match=r"learner process exited \(code -9\)"):
        remote.get_state()
    remote.close()
    assert os.sched_getaffinity(0) == available  # every core back to this process


_NO_MAIN_GUARD = """
from lcjax.config_io import load_config, resolve_config_path
from lcjax.rl.config import LearnerConfig
from lcjax.rl.learner_process import ProcessLearner
from lcjax.rl.objective import ObjectiveConfig
from lcjax.serve.loading import random_model
config, variables, _ = random_model(load_config(resolve_config_path("tiny")))
ProcessLearner(config.model, variables, LearnerConfig(), ObjectiveConfig(), 8)
"""


@pytest.mark.slow
def test_a_child_that_dies_while_starting_is_an_error_not_a_hang(tmp_path):
    """A script without a main guard: the spawned child re-runs it and fails before it reads
    anything; the parent must report that, not block writing the weights to it."""
    script = tmp_path / "no_guard.py"
    script.write_text(_NO_MAIN_GUARD)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "learner process exited (code 1)" in out.stderr


_PARENT = """
import sys, time
from lcjax.config_io import load_config, resolve_config_path
from lcjax.rl.config import LearnerConfig
from lcjax.rl.learner_process import ProcessLearner
from lcjax.rl.objective import ObjectiveConfig
from lcjax.serve.loading import random_model
if __name__ == "__main__":
    config, variables, _ = random_model(load_config(resolve_config_path("tiny")))
    learner = ProcessLearner(config.model, variables, LearnerConfig(), ObjectiveConfig(), 8)
    print(learner._proc.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_the_child_exits_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                return
            if state in ("Z", "X"):  # exited (a zombie if nothing reaps orphans here)
                return
            time.sleep(0.1)
        os.kill(child, signal.SIGKILL)
        pytest.fail(f"learner process {child} outlived its killed parent")
    finally:
        parent.kill()
