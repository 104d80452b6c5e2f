"""Loading onto shardings: one device in this process, 8 host devices in a child process."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.convert import load_hf_checkpoint, save_hf_checkpoint
from lcjax.convert.hf_names import plan
from lcjax.convert.safetensors_io import ShardedReader
from lcjax.convert.sharded_load import _read_unit, load_hf_sharded, sharding_of, rule_shardings
from lcjax.parallel.mesh import make_mesh
from lcjax.config import MeshConfig
from lcjax.serve.loading import random_model

HERE = pathlib.Path(__file__).parent
# The tiny model widened so that tensors (2 MB) dwarf the interpreter's own allocations.
WIDER = ("model.hidden_size=512", "model.ffn_hidden_size=1024", "model.moe.expert_ffn_size=512")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    config, variables, _ = random_model(load_config([resolve_config_path("tiny")]))
    path = tmp_path_factory.mktemp("sharded") / "hf"
    save_hf_checkpoint(variables, config, path, max_shard_size="40KB", zero_expert_stubs=False)
    return config, path


def test_one_device_load_equals_the_host_loader(tiny_hf):
    import jax

    config, path = tiny_hf
    shardings = rule_shardings(config, make_mesh(MeshConfig(), jax.devices()[:1]))
    _, got = load_hf_sharded(path, shardings, config)
    _, ref = load_hf_checkpoint(path, config)
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b)
    assert jax.tree.leaves(sharding_of(got)) == jax.tree.leaves(shardings)


def test_a_split_that_is_not_contiguous_in_the_file_reads_the_tensor_and_slices(tiny_hf):
    config, path = tiny_hf
    reader = ShardedReader(path)
    kv_b = next(l for l in plan(config.model) if l.path[-2:] == ("attn_0", "kv_b"))  # unit [C, H, D]
    key = kv_b.template.format(l=1, e=0)
    whole = kv_b.to_lcjax(reader.get(key))
    c, h, d = kv_b.unit_shape
    for bounds in (((0, c), (0, h), (2, d)),  # a trailing output dim split: not contiguous rows
                   ((4, c), (1, 3), (0, d)),  # the leading output dim: rows read directly
                   ((0, c // 2), (0, h), (0, d))):  # the input dim
        want = whole[tuple(slice(a, b) for a, b in bounds)]
        assert np.array_equal(_read_unit(reader, key, kv_b, bounds), want), bounds


def test_missing_sharding_is_named(tiny_hf):
    import jax

    config, path = tiny_hf
    shardings = rule_shardings(config, make_mesh(MeshConfig(), jax.devices()[:1]))
    del shardings["params"]["lm_head"]
    with pytest.raises(ValueError, match="params/lm_head"):
        load_hf_sharded(path, shardings, config)


@pytest.mark.slow
def test_eight_devices_tensor2_expert4(tmp_path):
    """HF (102 safetensors files) and orbax loads onto tensor 2 x expert 4 equal the host load leaf
    by leaf with the requested shardings; the memory plan equals the bytes placed per device."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    out = subprocess.run([sys.executable, str(HERE / "sharded_child.py"), str(tmp_path), *WIDER], env=env,
                         capture_output=True, text=True, timeout=600, cwd=HERE.parent.parent)
    assert out.returncode == 0, f"8-device child failed:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    print(stats)
    assert stats["files"] >= 2
    # Host staging is one shard plus one tensor's rows (and ~3 MB of interpreter allocations):
    # below the largest stacked leaf, which the host loader must hold whole, and the model.
    assert stats["host_peak_tracemalloc"] < stats["largest_leaf"] < stats["total"] / 4
