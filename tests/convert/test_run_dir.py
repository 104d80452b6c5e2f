"""lcjax-to-hf of a training run directory: the newest finished checkpoint's params, the run's config."""

import jax
import numpy as np
import pytest

from lcjax.config_io import dump_config
from lcjax.convert import load_hf_checkpoint, load_lcjax_checkpoint
from lcjax.convert.__main__ import main
from lcjax.train.checkpoint import RunCheckpoints
from lcjax.train.state import TrainState

from .conftest import read_tensors


@pytest.fixture(scope="module")
def run_dir(hub_checkpoint, tmp_path_factory):
    """A run directory as the trainer leaves it: config.yaml, tokenizer.json and two checkpoints
    of the Hub model's variables (step 3 zeroed, step 5 the real ones) written by RunCheckpoints,
    plus an unfinished step 7 (orbax's temporary name)."""
    config, variables = load_hf_checkpoint(hub_checkpoint[0])
    run = tmp_path_factory.mktemp("run")
    dump_config(config, run / "config.yaml")
    (run / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')

    def state(step, scale):
        params = jax.tree.map(lambda a: a * scale, variables["params"])
        return TrainState(step=np.int32(step), params=params,
                          opt_state={"mu": jax.tree.map(np.zeros_like, params)},
                          router_bias=variables["router_bias"], rng=np.zeros(2, np.uint32))

    ckpt = RunCheckpoints(str(run), keep=3, async_save=False)
    ckpt.save(3, state(3, 0), {"epoch": 0})
    ckpt.save(5, state(5, 1), {"epoch": 0})
    ckpt.close()
    (run / "checkpoints" / "7.orbax-checkpoint-tmp-1700000000").mkdir()
    return run, variables


def test_run_directory_converts_its_newest_checkpoint(hub_checkpoint, run_dir, tmp_path, capsys):
    run, _ = run_dir
    assert main(["lcjax-to-hf", str(run), str(tmp_path / "hf"), "--no-zero-expert-stubs",
                 "--max-shard-size", "40KB"]) == 0
    assert "(step 5)" in capsys.readouterr().out
    want, got = read_tensors(hub_checkpoint[0]), read_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want)
    for key, (array, dtype) in want.items():
        assert got[key][1] == dtype, key
        np.testing.assert_array_equal(got[key][0], array, err_msg=key)
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()


def test_one_step_directory_and_load(run_dir, tmp_path):
    run, variables = run_dir
    main(["lcjax-to-hf", str(run / "checkpoints" / "3"), str(tmp_path / "hf3")])
    _, zeroed = load_hf_checkpoint(tmp_path / "hf3")
    assert all(not np.any(a) for a in jax.tree.leaves(zeroed["params"]))
    _, loaded = load_lcjax_checkpoint(run)  # params + router bias of step 5, no optimizer state
    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def test_run_without_finished_checkpoint(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("{}\n")
    assert main(["lcjax-to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("training run without a finished checkpoint (no checkpoints/<step>/state/)"), err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()
