"""The RL loop end to end on a random tiny model: one version per trajectory, the staleness
bound on every trained group, weights reaching the rollout without a restart, sync mode, and a
resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
import zlib

import jax
import numpy as np
import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.rl.envs.base import Environment, Episode, StepResult
from lcjax.rl.config import LearnerConfig, LoopConfig, RLRunConfig, RolloutConfig
from lcjax.rl.objective import ObjectiveConfig
from lcjax.rl.loop import RLRun
from lcjax.serve.loading import random_model

pytestmark = pytest.mark.slow  # compiles the engine and the learner (~1 min on 2 cores)


@pytest.fixture(scope="module")
def policy():
    return random_model(load_config(resolve_config_path("tiny")))


def _cfg(mode, staleness=1, steps=4, run_dir="unused", placement="thread"):
    return RLRunConfig(rl=LoopConfig(mode=mode, staleness=staleness, steps=steps, groups_per_step=2,
                                     run_dir=run_dir),
                       learner=LearnerConfig(placement=placement),
                       rollout=RolloutConfig(group_size=4, max_tokens=6, max_num_seqs=32, max_model_len=64),
                       objective=ObjectiveConfig(filter_equal_groups=False))


class CoinEnv(Environment):
    """Reward 1 for outputs with an odd CRC: varied rewards from a random model, so groups
    carry signal and the learner really updates."""

    name = "coin"

    def sample(self, rng):
        return {"n": int(rng.integers(10))}

    def reset(self, problem):
        class _Ep(Episode):
            prompt = f"x = {problem['n']}"

            def step(self, text):
                return StepResult(float(zlib.crc32(text.encode()) % 2), True)
        return _Ep()


class _Spy(RLRun):
    """Records what the loop trains and what each engine runs."""

    def _make_batch(self, gids):
        groups = [self.buffer[g] for g in gids]
        for group in groups:
            for t in group.trajectories:
                assert t.versions_used == {group.version}  # one version, start to end
        return super()._make_batch(gids)

    def _publish(self):
        super()._publish()
        newest = max(self.rollout.engines)
        engine_params = self.rollout.engines[newest].variables["params"]
        # the newest engine runs what the learner just published, without a copy
        learner_params = self.learner.variables()["params"]
        assert jax.tree.all(jax.tree.map(lambda a, b: a is b, engine_params, learner_params))


@pytest.mark.parametrize("mode, placement", [("async", "thread"), ("async", "process"), ("sync", "thread")])
def test_versions_and_staleness(policy, mode, placement):
    run = _Spy(_cfg(mode, staleness=1, steps=4, placement=placement), policy, log=lambda s: None,
               write_files=False)
    assert run.placement == placement
    run.env = run.rollout.env = CoinEnv()
    start = jax.tree.map(np.asarray, run.learner.state.params)
    summary = run.run()
    assert summary.steps == 4
    k = 1 if mode == "async" else 0
    assert run.trained_versions and all(0 <= u - v <= k for u, v in run.trained_versions)
    assert run.window.max_live <= k + 1
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), run.learner.state.params, start)
    assert max(jax.tree.leaves(moved)) > 0  # the learner changed the weights the rollout runs
    if mode == "sync":
        assert set(summary.staleness_hist) == {0}


@pytest.mark.parametrize("placement", ["thread", "process"])
def test_kill9_and_resume(tmp_path, placement):
    """A run killed with SIGKILL after its first checkpoint resumes from it and finishes (with
    the learner in a child process: the child leaves with its parent, the state is pushed back)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-c", (
        "import sys; from lcjax.rl.__main__ import main; sys.exit(main(sys.argv[1:]))"),
        "policy.format=random", "policy.path=tiny", f"rl.run_dir={run_dir}", "rl.steps=6", "rl.checkpoint_every=2",
        "rl.groups_per_step=2", "rollout.group_size=4", "rollout.max_tokens=4",
        "rollout.max_model_len=64", "objective.filter_equal_groups=false", f"learner.placement={placement}"]
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.monotonic() + 600
    ckpts = run_dir / "checkpoints"
    while time.monotonic() < deadline:
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            break
        if proc.poll() is not None:
            pytest.fail(proc.stdout.read())
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 6
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from" in out.stdout
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    assert steps[-1] == 6 and (run_dir / "reward.png").is_file()


def test_packed_logprobs_equal_one_trajectory_per_row(policy):
    """Segments isolate trajectories: packed rows give each its own logprobs."""
    from lcjax.rl.learner import build_batch, token_logprobs
    config, variables, _ = policy
    rng = np.random.default_rng(0)
    trajs = [{"tokens": rng.integers(3, 200, n).tolist(), "gen_mask": [True] * n,
              "logprobs": [0.0] * n, "advantage": 0.0} for n in (9, 13, 6)]
    packed = build_batch(trajs, 4, 32)
    single = [build_batch([t], 4, 32) for t in trajs]
    fn = jax.jit(lambda *a: token_logprobs(config.model, *a))
    lp = lambda b: np.asarray(fn(variables["params"], variables["router_bias"], b.tokens,
                                 b.segment_ids, b.positions))
    got = lp(packed)
    for t, b in zip(trajs, single):
        want = lp(b)[0, : len(t["tokens"]) - 1]
        row = np.argwhere((packed.tokens == t["tokens"][0]) & (packed.positions == 0))[0]
        np.testing.assert_allclose(got[row[0], row[1]: row[1] + len(want)], want, rtol=2e-4, atol=2e-5)
