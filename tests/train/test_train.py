"""End-to-end training: determinism, exact resume, checkpoints, metrics, growth, failures."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lcjax.train import loop
from lcjax.train.checkpoint import restore_params

from .conftest import train_config


def test_resume_continues_bit_for_bit_and_runs_are_deterministic(corpus, tmp_path):
    straight = loop.train(train_config(corpus, tmp_path / "a"))
    again = loop.train(train_config(corpus, tmp_path / "b"), stop_after=3)
    assert again.final_step == 3 and again.checkpoint.endswith("3")
    resumed = loop.train(train_config(corpus, tmp_path / "b"))
    assert resumed.start_step == 3 and resumed.final_step == 6
    assert straight.losses == again.losses + resumed.losses  # exact, not approximate
    assert len(straight.losses) == 6 and all(np.isfinite(straight.losses))

    run = tmp_path / "a"
    assert sorted(os.listdir(run / "checkpoints")) == ["3", "6"]
    assert {"config.yaml", "tokenizer.json", "metrics.jsonl", "tensorboard"} <= set(os.listdir(run))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 7))
    assert {"train/ce", "train/mtp_ce", "train/zero_share", "train/expert_load_max_over_mean",
            "train/grad_norm", "train/tokens_per_second"} <= set(rows[1])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tensorboard"))


def test_router_bias_moves_and_params_restore(corpus, tmp_path):
    cfg = train_config(corpus, tmp_path / "r", "train.steps=3")
    loop.train(cfg)
    from lcjax.train.checkpoint import RunCheckpoints
    from lcjax.train.state import abstract_state, create_optimizer
    abstract, _ = abstract_state(cfg, create_optimizer(cfg))
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    state, data = RunCheckpoints(str(tmp_path / "r"), 3, False).restore(3, abstract, shardings)
    bias = np.asarray(state.router_bias["layers"]["moe"]["e_score_correction_bias"])
    e = cfg.model.moe.num_experts
    assert np.all(bias[:, e:] == 0.0) and np.any(bias[:, :e] != 0.0)  # zero experts untouched
    assert int(state.step) == 3 and "iterator" in data


@pytest.mark.slow  # trains a checkpoint first
def test_growth_stacks_a_shallower_checkpoint(corpus, tmp_path):
    shallow = train_config(corpus, tmp_path / "shallow", "train.steps=2")
    loop.train(shallow)
    deep = train_config(corpus, tmp_path / "deep", "train.steps=1", "model.num_layers=2",
                        "model.loza.layer_pattern=0101", f"train.init_from={tmp_path / 'shallow'}",
                        "train.growth=stack")
    grown = loop._initial_state(deep, *_tx_mesh_shardings(deep))
    old = restore_params(str(tmp_path / "shallow"), None)
    for path, leaf in jax.tree_util.tree_flatten_with_path(grown.params["layers"])[0]:
        src = old["layers"]
        for k in path:
            src = src[k.key]
        np.testing.assert_array_equal(np.asarray(leaf), np.concatenate([src, src]))
    np.testing.assert_array_equal(grown.params["lm_head"], old["lm_head"])


def _tx_mesh_shardings(config):
    from lcjax.parallel import make_mesh
    from lcjax.train.state import create_optimizer, state_shardings
    tx = create_optimizer(config)
    mesh = make_mesh(config.mesh)
    return tx, mesh, state_shardings(config, tx, mesh)


@pytest.mark.slow  # trains a checkpoint first
def test_growth_rejects_depth_that_is_not_a_multiple(corpus, tmp_path):
    loop.train(train_config(corpus, tmp_path / "s", "train.steps=1", "model.num_layers=2",
                            "model.loza.layer_pattern=0101"))
    deep = train_config(corpus, tmp_path / "d", "model.num_layers=3", "model.loza.layer_pattern=010101",
                        f"train.init_from={tmp_path / 's'}", "train.growth=stack")
    with pytest.raises(ValueError, match="multiple"):
        loop._initial_state(deep, *_tx_mesh_shardings(deep))


def test_non_finite_loss_stops_and_names_the_step(corpus, tmp_path):
    cfg = train_config(corpus, tmp_path / "nan", "optimizer.learning_rate=1e30",
                       "optimizer.grad_clip=0", "optimizer.warmup_steps=0")
    with pytest.raises(loop.NonFiniteLoss, match="at step"):
        loop.train(cfg)


def test_interrupt_saves_a_checkpoint(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = loop.data_setup.to_global

    def interrupt_at_third(batch, sharding):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(batch, sharding)

    monkeypatch.setattr(loop.data_setup, "to_global", interrupt_at_third)
    summary = loop.train(train_config(corpus, tmp_path / "int", "train.checkpoint_every=100"))
    assert summary.interrupted and summary.final_step == 2 and summary.checkpoint.endswith("2")


@pytest.mark.parametrize("overrides, message", [
    (["data.path=/nonexistent/*.txt"], "data"),
    (["mesh.data=3"], "mesh"),
])
def test_bad_input_stops_before_work(corpus, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        loop.train(train_config(corpus, tmp_path / "bad", *overrides))


def test_sequence_longer_than_model_maximum_is_a_config_error(corpus, tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        train_config(corpus, tmp_path, "data.seq_len=1024")


_SHARDED = """
import json, sys
sys.path.insert(0, {root!r})
from tests.train.conftest import train_config
from lcjax.train import loop
cfg = train_config({corpus!r}, {run!r}, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                   "data.global_batch=8", "train.steps=4")
print(json.dumps(loop.train(cfg).losses))
"""


@pytest.mark.slow
def test_eight_host_devices_match_one_device(corpus, tmp_path):
    one = loop.train(train_config(corpus, tmp_path / "one", "data.global_batch=8", "train.steps=4"))
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags,
           "JAX_PLATFORMS": "cpu", "LCJAX_TYPECHECK": "0"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _SHARDED.format(root=root, corpus=corpus, run=str(tmp_path / "eight"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=900, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    eight = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(eight, one.losses, rtol=2e-4)
