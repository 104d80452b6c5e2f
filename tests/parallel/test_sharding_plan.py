"""Sharding plans without devices: rule presets, resolution, and the 560B model on 256 chips."""

import math

import jax
import pytest
from jax.sharding import PartitionSpec as P

from lcjax.config import MeshConfig
from lcjax.config_io import load_config, resolve_config_path
from lcjax.parallel import abstract_mesh, load_rules, resolve_spec, resolve_specs, shard_bytes
from lcjax.parallel.mesh import mesh_shape
from lcjax.parallel.rules import RULES_DIR, parse_rules
from lcjax.train.state import abstract_state, create_optimizer

GB = 1e9
# (rules preset, mesh on 256 devices): pure FSDP, FSDP x TP, EP x FSDP x TP.
PLANS = {
    "fsdp": MeshConfig(data=1, fsdp=-1),
    "fsdp_tp": MeshConfig(data=1, fsdp=-1, tensor=8),
    "ep_fsdp_tp": MeshConfig(data=1, fsdp=4, expert=32, tensor=2),
}


def test_every_rules_preset_loads():
    names = sorted(p.stem for p in RULES_DIR.glob("*.yaml"))
    assert names == ["ep_fsdp_tp", "ep_tp", "fsdp", "fsdp_tp"]
    for name in names:
        rules = load_rules(name)
        assert dict(rules)["batch"] and all(isinstance(r[0], str) for r in rules)


def test_resolution_follows_rule_order_and_drops_axes_that_do_not_divide():
    rules = load_rules("ep_fsdp_tp")
    sizes = {"data": 2, "fsdp": 4, "expert": 8, "tensor": 2}
    # expert weights: experts take `expert`, so embed falls back to its second rule (fsdp alone)
    assert resolve_spec((512, 6144, 2048), ("experts", "embed", "expert_mlp"), sizes, rules) == \
        P("expert", "fsdp", "tensor")
    assert resolve_spec((6144, 12288), ("embed", "mlp"), sizes, rules) == P(("fsdp", "expert"), "tensor")
    # 769 n-gram rows and 12 columns (fsdp x expert = 32 does not divide 12, fsdp = 4 does),
    # a batch of 4 rows on 64 data-parallel devices: keep what divides
    assert resolve_spec((769, 12), ("ngram_rows", "ngram_dim"), sizes, rules) == P(None, "fsdp")
    assert resolve_spec((4, 16, 6144), ("batch", "length", "embed"), sizes, rules) == P("data", None, None)
    assert resolve_spec((6, 8), ("embed", "vocab"), {"fsdp": 4, "tensor": 1}, rules) == P(None, None)


@pytest.mark.parametrize("bad, message", [
    ({"rules": []}, "non-empty"),
    ({"rules": [["embed", "nodes"]]}, "mesh axes 'nodes'"),
    ({"rules": [["embed"]]}, "pair"),
])
def test_bad_rule_tables_name_the_rule(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_rules(bad)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="presets: ep_fsdp_tp, ep_tp, fsdp, fsdp_tp"):
        load_rules("megatron")


def test_mesh_shapes_with_dcn():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 16) == (4, 2, 1, 2)
    assert mesh_shape(MeshConfig(data=-1, fsdp=8, dcn_data=4), 64) == (8, 8, 1, 1)
    assert mesh_shape(MeshConfig(data=1, fsdp=8, dcn_data=4), 32) == (4, 8, 1, 1)
    with pytest.raises(ValueError, match="dcn_data=3"):
        mesh_shape(MeshConfig(data=-1, fsdp=8, dcn_data=3), 64)
    with pytest.raises(ValueError, match="use 12 devices but 16"):
        mesh_shape(MeshConfig(data=3, tensor=4), 16)


@pytest.mark.parametrize("preset", sorted(PLANS))
def test_560b_fits_80gb_per_device_on_256_chips(preset, capsys):
    """Resolved sharding of every parameter of LongCat-Flash, and the bytes one chip holds of
    the fp32 params plus AdamW's two fp32 moments (the whole TrainState)."""
    config = load_config(resolve_config_path("longcat_flash"), [f"parallel.rules={preset}"])
    mesh = abstract_mesh(PLANS[preset], 256)
    sizes = dict(mesh.shape)
    rules = load_rules(preset)
    state, logical = abstract_state(config, create_optimizer(config))
    specs = resolve_specs(state, logical, sizes, rules)
    rows = jax.tree_util.tree_flatten_with_path(state.params)[0]
    param_specs = jax.tree.leaves(specs.params, is_leaf=lambda x: isinstance(x, P))
    total = sum(math.prod(leaf.shape) for _, leaf in rows)
    assert 560e9 < total < 563e9  # 560.7B backbone + MTP block
    with capsys.disabled():
        print(f"\n{preset} on {dict(sizes)}: {len(rows)} parameters")
        for (path, leaf), spec in zip(rows, param_specs):
            print(f"  {jax.tree_util.keystr(path):<48} {str(leaf.shape):<28} {spec}")
    param_bytes = shard_bytes(state.params, specs.params, sizes)
    state_bytes = shard_bytes(state, specs, sizes)
    with capsys.disabled():
        print(f"  per device: params {param_bytes / GB:.1f} GB, params + optimizer "
              f"{state_bytes / GB:.1f} GB (of 80 GB)")
    assert state_bytes < 80 * GB
    assert state_bytes > 12 * total / 256  # at least its even share: nothing was left out
    # the expert weights (97% of the model) are split over all 256 devices in each preset
    gate = specs.params["layers"]["moe"]["gate"]
    split = math.prod(sizes[a] for s in gate for a in ((s,) if isinstance(s, str) else s or ()))
    assert split == 256, gate


def test_flash_lite_ngram_tables_split_by_column():
    """Flash-Lite's 31B n-gram table params (odd row counts) shard by column, not replicate."""
    config = load_config(resolve_config_path("longcat_flash_lite"), ["parallel.rules=fsdp"])
    sizes = dict(abstract_mesh(MeshConfig(data=1, fsdp=-1), 64).shape)
    state, logical = abstract_state(config, create_optimizer(config))
    specs = resolve_specs(state, logical, sizes, load_rules("fsdp"))
    ngram = state.params["embed"]["ngram"]
    tables = [k for k in ngram if k.startswith("table_")]
    assert len(tables) == config.model.ngram.num_tables
    for name in tables:
        assert ngram[name].shape[0] % 2 == 1  # odd rows: only the columns can split
        assert specs.params["embed"]["ngram"][name] == P(None, "fsdp")
    state_bytes = shard_bytes(state, specs, sizes)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    assert state_bytes < 1.05 * 12 * total / 64  # within 5% of a perfect 64-way split
