"""Every configs/rl YAML loads through the real loader; overrides and errors name the key."""

import dataclasses
import pathlib

import pytest

from lcjax.config_io import REPO_ROOT, load_dataclass
from lcjax.rl.config import RLRunConfig, make_env
from lcjax.rl.policy import load_policy

RL_FILES = sorted((REPO_ROOT / "configs" / "rl").glob("*.yaml"))


@pytest.mark.parametrize("path", RL_FILES, ids=lambda p: p.name)
def test_rl_yaml_loads(path: pathlib.Path):
    cfg = load_dataclass(RLRunConfig(), path)
    assert isinstance(cfg, RLRunConfig)
    assert load_dataclass(RLRunConfig(), None, _as_overrides(dataclasses.asdict(cfg))) == cfg
    make_env(cfg.env)


def _as_overrides(tree, prefix=""):
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _as_overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={'none' if v is None else v}")
    return out


def test_overrides_and_errors():
    cfg = load_dataclass(RLRunConfig(), RL_FILES[0], ["rl.mode=sync", "env.name=calculator"])
    assert cfg.rl.mode == "sync" and cfg.rl.effective_staleness == 0 and cfg.rl.per_version == cfg.rl.groups_per_step
    assert cfg.rl.groups_per_step > 0 and make_env(cfg.env).name == "calculator"
    with pytest.raises(ValueError, match="rl.mode"):
        load_dataclass(RLRunConfig(), None, ["rl.mode=fast"])
    with pytest.raises(ValueError, match="did you mean 'rl.staleness'"):
        load_dataclass(RLRunConfig(), None, ["rl.stalenes=1"])
    with pytest.raises(ValueError, match="rollout.group_size"):
        load_dataclass(RLRunConfig(), None, ["rollout.group_size=1"])


def test_learner_placement():
    import os

    import jax

    from lcjax.rl.config import LearnerConfig, learner_placement
    split = jax.default_backend() == "cpu" and len(os.sched_getaffinity(0)) >= 2
    assert learner_placement(LearnerConfig(), "async") == ("process" if split else "thread")
    assert learner_placement(LearnerConfig(), "sync") == "thread"
    assert learner_placement(LearnerConfig(placement="thread"), "async") == "thread"
    assert learner_placement(LearnerConfig(placement="process"), "async") == "process"
    assert learner_placement(LearnerConfig(placement="process"), "sync") == "thread"  # no overlap
    with pytest.raises(ValueError, match="learner.placement.*'gpu'"):
        load_dataclass(RLRunConfig(), None, ["learner.placement=gpu"])


def test_missing_policy_says_how_to_make_it(tmp_path):
    cfg = load_dataclass(RLRunConfig(), None, [f"policy.path={tmp_path / 'nope'}"])
    with pytest.raises(ValueError, match="python -m lcjax.train"):
        load_policy(cfg.policy)
