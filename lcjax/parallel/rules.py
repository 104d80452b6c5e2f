"""Logical axis names -> mesh axes: the rule tables of the project (DESIGN principle 3).

A rule table is an ordered list of (logical name, mesh axes) pairs, kept in YAML presets under
configs/rules (`fsdp`, `fsdp_tp`, `ep_fsdp_tp`) and chosen by `parallel.rules`. Resolution
follows flax's: for each array dimension, the first rule for its logical name whose mesh axes
are all still unused in that array; a mesh axis is used at most once per array. On top of that
`resolve_spec` drops a mesh axis whose size does not divide the dimension (jit refuses uneven
splits), so one table serves every model size: e.g. the N-gram tables' odd row counts stay whole.
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import Any, Mapping, Optional, Sequence

import jax
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcjax.config_io import REPO_ROOT

RULES_DIR = REPO_ROOT / "configs" / "rules"
DEFAULT_RULES = "ep_fsdp_tp"
MESH_AXIS_NAMES = ("data", "fsdp", "expert", "tensor")

Rules = tuple[tuple[str, Any], ...]  # ((logical name, None | mesh axis | tuple of mesh axes), ...)


def _as_axes(value, where: str):
    """YAML value -> None, one mesh axis name, or a tuple of them; ValueError naming the rule."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else None
    if names is None or not all(isinstance(n, str) and n in MESH_AXIS_NAMES for n in names):
        raise ValueError(f"{where}: mesh axes {value!r} must be null, one of {list(MESH_AXIS_NAMES)} "
                         "or a list of them")
    return names[0] if len(names) == 1 else tuple(names)


def parse_rules(data: Any, where: str = "rules") -> Rules:
    """Validate a `{rules: [[logical, axes], ...]}` mapping (or the bare list) into a Rules tuple."""
    items = data.get("rules") if isinstance(data, Mapping) else data
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: expected a non-empty list `rules: [[logical_name, mesh_axes], ...]`")
    rules = []
    for i, item in enumerate(items):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"{where}: rule {i} = {item!r} is not a [logical_name, mesh_axes] pair")
        rules.append((item[0], _as_axes(item[1], f"{where}: rule {i} ({item[0]})")))
    return tuple(rules)


@functools.lru_cache(maxsize=None)
def load_rules(name_or_path: str = DEFAULT_RULES) -> Rules:
    """A preset name in configs/rules (`fsdp`, `fsdp_tp`, `ep_fsdp_tp`) or a YAML file path."""
    path = pathlib.Path(name_or_path)
    if not path.is_file():
        path = RULES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in RULES_DIR.glob("*.yaml"))
        raise ValueError(f"parallel.rules={name_or_path!r} is neither a YAML file nor a preset "
                         f"in {RULES_DIR} (presets: {', '.join(presets)})")
    return parse_rules(yaml.safe_load(path.read_text()), str(path))


def rules_for(config) -> Rules:
    """The rule table of a run Config (its `parallel.rules`)."""
    return load_rules(config.parallel.rules)


LOGICAL_AXIS_RULES: Rules = load_rules(DEFAULT_RULES)


def axis_tuple(axes) -> tuple[str, ...]:
    """A PartitionSpec entry (None, one mesh axis, or several) as a tuple of mesh axes."""
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def spec_entry(axes: Sequence[str]):
    """The inverse of axis_tuple: () -> None, (a,) -> a, (a, b) -> (a, b)."""
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def mesh_axes_of(logical: str, rules: Rules = LOGICAL_AXIS_RULES) -> tuple[str, ...]:
    """Mesh axes of a logical name on its own (its first rule), e.g. batch -> (data, fsdp, expert)."""
    for name, axes in rules:
        if name == logical:
            return axis_tuple(axes)
    return ()


def resolve_spec(shape: Sequence[int], logical: Sequence[Optional[str]], axis_sizes: Mapping[str, int],
                 rules: Rules = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dims carry `logical` names, on a mesh of
    `axis_sizes`: flax's resolution, minus mesh axes of size 1 or that do not divide a dim."""
    if len(shape) != len(logical):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical)} differ in rank")
    # Rules in table order, each assigned to the first still-unassigned dim of its name when its
    # mesh axes are all free (flax's `_logical_to_mesh_axes`): table order is the priority.
    assigned: list = [None] * len(shape)
    used: set[str] = set()
    names = list(logical)
    for rule_name, axes in rules:
        axes = axis_tuple(axes)
        if rule_name not in names:
            continue
        pos = names.index(rule_name)
        if assigned[pos] is None and not used.intersection(axes):
            assigned[pos] = axes
            used.update(axes)
    out = []
    for dim, axes in zip(shape, assigned):
        kept, split = [], 1
        for axis in axes or ():
            size = axis_sizes.get(axis, 1)
            if size > 1 and dim % (split * size) == 0:
                kept.append(axis)
                split *= size
        out.append(spec_entry(kept))
    return PartitionSpec(*out)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def resolve_specs(abstract: Any, logical_specs: Any, axis_sizes: Mapping[str, int],
                  rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Mesh PartitionSpecs for a tree of arrays (or ShapeDtypeStructs) and its logical specs.
    An absent subtree (None, e.g. a TrainState without LoRA adapters) stays None."""
    def one(leaf, spec):
        if leaf is None:
            return None
        names = tuple(spec) + (None,) * (leaf.ndim - len(spec))
        return resolve_spec(leaf.shape, names, axis_sizes, rules)
    return jax.tree.map(one, abstract, logical_specs, is_leaf=lambda x: _is_spec(x) or x is None)


def logical_shardings(logical_specs: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES, *,
                      abstract: Any) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs (from `nn.get_partition_spec`) and
    the matching tree of shapes `abstract` (mesh axes that do not divide a dim are dropped)."""
    specs = resolve_specs(abstract, logical_specs, dict(mesh.shape), rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def shard_bytes(abstract: Any, mesh_specs: Any, axis_sizes: Mapping[str, int]) -> int:
    """Bytes one device holds of a tree of arrays sharded by `mesh_specs` (ceil per dim)."""
    total = 0
    for leaf, spec in zip(jax.tree.leaves(abstract), jax.tree.leaves(mesh_specs, is_leaf=_is_spec)):
        shard = [math.ceil(d / math.prod(axis_sizes[a] for a in axis_tuple(s)))
                 for d, s in zip(leaf.shape, tuple(spec) + (None,) * (leaf.ndim - len(spec)))]
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def cache_shardings(cache: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a decode cache (lcjax.model.ModelCache, or any tree of [B, ...] leaves).

    Rows follow the batch rule; the MLA latent is shared by every head, so its feature dims stay
    whole on each tensor-parallel device (as vLLM / SGLang keep the MLA cache under TP).
    """
    def one(leaf):
        spec = resolve_spec(leaf.shape, ("batch",) + (None,) * (leaf.ndim - 1), dict(mesh.shape), rules)
        return NamedSharding(mesh, spec)
    return jax.tree.map(one, cache)
