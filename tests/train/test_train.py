"""End-to-end training: checkpoints, growth, failures, sharded equality (resume: test_faults)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lcjax.train import loop
from lcjax.train.checkpoint import restore_init

from .conftest import train_config


def test_router_bias_moves_and_params_restore(corpus, tmp_path):
    cfg = train_config(corpus, tmp_path / "r")  # the shape of test_faults' runs: a cached compile
    loop.train(cfg, stop_after=3)
    from lcjax.train.checkpoint import RunCheckpoints
    from lcjax.train.state import abstract_state, create_optimizer
    abstract, _ = abstract_state(cfg, create_optimizer(cfg))
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    state, data = RunCheckpoints(str(tmp_path / "r"), 3, False).restore(3, abstract, shardings)
    bias = np.asarray(state.router_bias["layers"]["moe"]["e_score_correction_bias"])
    e = cfg.model.moe.num_experts
    assert np.all(bias[:, e:] == 0.0) and np.any(bias[:, :e] != 0.0)  # zero experts untouched
    assert int(state.step) == 3 and "iterator" in data

    # What `python -m lcjax.train` prints after training: completions from this checkpoint.
    from lcjax.train.samples import PROMPTS, completions
    rows = completions(str(tmp_path / "r"), max_tokens=3)
    assert [r[0] for r in rows] == list(PROMPTS)
    assert all(isinstance(g, str) and isinstance(s, str) for _, g, s in rows)


@pytest.mark.slow  # trains a checkpoint first
def test_growth_stacks_a_shallower_checkpoint(corpus, tmp_path):
    shallow = train_config(corpus, tmp_path / "shallow", "train.steps=2")
    loop.train(shallow)
    deep = train_config(corpus, tmp_path / "deep", "train.steps=1", "model.num_layers=2",
                        "model.loza.layer_pattern=0101", f"train.init_from={tmp_path / 'shallow'}",
                        "train.growth=stack")
    grown = loop._initial_state(deep, *_tx_mesh_shardings(deep))
    old, old_bias = restore_init(str(tmp_path / "shallow"))
    for path, leaf in jax.tree_util.tree_flatten_with_path(grown.params["layers"])[0]:
        src = old["layers"]
        for k in path:
            src = src[k.key]
        np.testing.assert_array_equal(np.asarray(leaf), np.concatenate([src, src]))
    np.testing.assert_array_equal(grown.params["lm_head"], old["lm_head"])
    # The trained router bias comes along, stacked like the layers (it is not re-learned).
    bias = old_bias["layers"]["moe"]["e_score_correction_bias"]
    assert np.abs(bias).max() > 0
    np.testing.assert_array_equal(
        np.asarray(grown.router_bias["layers"]["moe"]["e_score_correction_bias"]),
        np.concatenate([bias, bias]))


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


def test_bits_per_byte_counts_the_bytes_of_the_heldout_text(corpus, tmp_path):
    cfg = train_config(corpus, tmp_path / "bpb")
    tokenizer = loop.data_setup.run_tokenizer(cfg)
    text = "déjà vu: naïve café — 東京 ✓ def f(x): return x"
    assert tokenizer.token_bytes()[tokenizer.encode(text)].sum() == len(text.encode("utf-8"))
    batches = loop.with_target_bytes(loop.data_setup.eval_batches(cfg, tokenizer),
                                     tokenizer.token_bytes())
    counted = 0
    for batch in batches:
        for targets, mask, nbytes in zip(batch["targets"], batch["loss_mask"], batch["target_bytes"]):
            real = np.asarray(mask) > 0
            expected = len(tokenizer.decode(np.asarray(targets)[real]).encode("utf-8"))
            assert float(np.sum(np.asarray(nbytes)[real])) == expected
            counted += expected
    assert counted > 0
