"""Load a checkpoint straight onto target shardings: each device receives only its shard.

HF safetensors (`load_hf_sharded`): for every lcjax leaf, each distinct shard (devices that
hold the same slice share one) is assembled on the host from the HF tensors it covers: only the
rows of a tensor that the shard needs are read (its leading dim: the output channels of a
Linear, the rows of an embedding), transposed into the lcjax layout, cast to the leaf's dtype,
put on its devices, and dropped. Peak host memory is one shard of one leaf plus one tensor's
rows, never a whole stacked [L, E, M, F] leaf nor the model.

orbax (`load_lcjax_sharded`): a converted directory or a training run, restored by orbax with a
target sharding per leaf (each process reads only its devices' slices).

`rule_shardings(config, mesh)` gives the targets the rule table assigns
(`parallel.rules`): a {"params", "router_bias"} tree of NamedShardings.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lcjax.config import Config, ModelConfig
from lcjax.convert import orbax_io
from lcjax.convert.hf import _source_key, check_checkpoint, config_from_checkpoint
from lcjax.convert.hf_names import Leaf, abstract_variables
from lcjax.convert.safetensors_io import ShardedReader
from lcjax.model import BIAS_COLLECTION, LongCatModel
from lcjax.parallel.rules import Rules, logical_shardings, rules_for

Index = tuple[slice, ...]


def rule_shardings(config: Config, mesh: Mesh, rules: Optional[Rules] = None) -> dict:
    """NamedShardings of {"params", "router_bias"} under the rules (default `config.parallel.rules`)."""
    boxed = jax.eval_shape(LongCatModel(config.model).init, jax.random.key(0),
                           jax.ShapeDtypeStruct((1, 8), jnp.int32))
    keep = {k: boxed[k] for k in ("params", BIAS_COLLECTION)}
    return logical_shardings(nn.get_partition_spec(keep), mesh, rules or rules_for(config),
                             abstract=nn.unbox(keep))


def _lookup(tree: Any, keys: tuple[str, ...], what: str) -> Any:
    node = tree
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"{what} has no entry for {'/'.join(keys)!r} (missing "
                             f"{'/'.join(keys[:i + 1])!r}); expected the tree of "
                             "rule_shardings(config, mesh)")
        node = node[key]
    return node


def _bounds(index: Index, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(d)[:2] for s, d in zip(index, shape))


def _read_unit(reader: ShardedReader, source: str, leaf: Leaf,
               bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The `bounds` part of one HF tensor in the lcjax unit layout, reading only the HF rows
    (leading dim) that the part covers when the rest of that dim's slice is whole."""
    unit = leaf.unit_shape
    k = leaf.linear_axes
    if not unit:
        return reader.get(source)
    if k == 0:  # stored as-is: the shard's rows of dim 0, then its columns
        lo, hi = bounds[0]
        block = reader.read_rows(source, lo, hi)
        return block[(slice(None),) + tuple(slice(a, b) for a, b in bounds[1:])]
    # torch Linear [out, in]: the HF rows are the flattened output dims unit[k:]; the rows of
    # the shard are contiguous when only the leading output dim is split.
    if any(b != (0, d) for b, d in zip(bounds[k + 1:], unit[k + 1:])):
        full = leaf.to_lcjax(reader.get(source))
        return full[tuple(slice(lo, hi) for lo, hi in bounds)]
    lo, hi = bounds[k]
    per_index = math.prod(unit[k + 1:])  # HF rows per index of the leading output dim
    block = reader.read_rows(source, lo * per_index, hi * per_index)  # [rows, in]
    block = block.T.reshape(unit[:k] + (hi - lo,) + unit[k + 1:])  # lcjax [*in, out_lead, *out_rest]
    return block[tuple(slice(a, b) for a, b in bounds[:k])]


def _build_shard(reader: ShardedReader, leaf: Leaf, bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
    """One device shard of `leaf` (its global `bounds`), assembled from the HF tensors it covers."""
    out = np.empty(tuple(hi - lo for lo, hi in bounds), leaf.dtype)
    stacked = (leaf.layers is not None) + (leaf.experts is not None)
    lead, unit_bounds = bounds[:stacked], bounds[stacked:]
    ranges = [range(lo, hi) for lo, hi in lead]
    for pos in np.ndindex(*(len(r) for r in ranges)):
        ids = [r[p] for r, p in zip(ranges, pos)]
        l = ids[0] if leaf.layers is not None else 0
        e = ids[-1] if leaf.experts is not None else 0
        key = leaf.template.format(l=l, e=e)
        source = _source_key(key, reader)
        out[pos] = _read_unit(reader, source, leaf, unit_bounds)  # assignment casts the dtype
    return out


def put_leaf(leaf: Leaf, sharding: jax.sharding.Sharding, build) -> jax.Array:
    """A global array of `leaf.shape` on `sharding`; `build(bounds)` gives one host shard, called
    once per distinct slice among this process's devices and dropped after its transfer."""
    by_index: dict = {}
    for device, index in sharding.addressable_devices_indices_map(leaf.shape).items():
        by_index.setdefault(_bounds(index, leaf.shape), []).append(device)
    arrays = []
    for bounds, devices in by_index.items():
        host = build(bounds)
        arrays += [jax.device_put(host, d) for d in devices]
        jax.block_until_ready(arrays[-len(devices):])
        del host
    return jax.make_array_from_single_device_arrays(leaf.shape, sharding, arrays)


def load_hf_sharded(path: Union[str, os.PathLike], shardings: Any,
                    config: Optional[Union[Config, ModelConfig]] = None) -> tuple[Config, dict]:
    """A HF LongCat directory read straight onto `shardings`, one shard of one tensor at a time.

    Args:
      path: directory with config.json and safetensors (one file, or shards + index).
      shardings: {"params": ..., "router_bias": ...} of NamedSharding, as `rule_shardings`
        gives (a leaf's sharding decides which slice each device reads).
      config: the Config / ModelConfig to load into; None derives it from config.json.
    Returns:
      (Config, variables) of jax Arrays with exactly the requested shardings.
    Raises:
      ValueError naming a missing or mis-shaped tensor (checked before any read), or a leaf
      the shardings tree lacks.
    """
    reader = ShardedReader(path)
    if config is None:
        cfg = config_from_checkpoint(path, reader)
    else:
        cfg = config if isinstance(config, Config) else Config(model=config)
    leaves = check_checkpoint(reader, cfg.model)
    targets = {leaf.name: _lookup(shardings, (leaf.collection, *leaf.path), "shardings")
               for leaf in leaves}
    variables: dict = {}
    for leaf in leaves:
        array = put_leaf(leaf, targets[leaf.name],
                         lambda bounds, leaf=leaf: _build_shard(reader, leaf, bounds))
        orbax_io.nest(variables, (leaf.collection, *leaf.path), array)
    return cfg, variables


def load_lcjax_sharded(path: Union[str, os.PathLike], shardings: Any) -> tuple[Config, dict]:
    """An lcjax checkpoint (converted directory, training run or one step) restored by orbax onto
    `shardings` ({"params", "router_bias"} of NamedSharding, e.g. `rule_shardings`)."""
    config = orbax_io.read_lcjax_config(path)
    flat = jax.tree_util.tree_flatten_with_path(abstract_variables(config.model))[0]
    targets: dict = {}
    for keypath, leaf in flat:
        keys = tuple(k.key for k in keypath)
        sharding = _lookup(shardings, keys, "shardings")
        orbax_io.nest(targets, keys, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
    return config, orbax_io.load_lcjax_onto(path, targets)


def sharding_of(tree: Any) -> Any:
    """The tree of each leaf's sharding (for checks: equals the requested shardings)."""
    return jax.tree.map(lambda a: a.sharding, tree)


__all__ = ["load_hf_sharded", "load_lcjax_sharded", "put_leaf", "sharding_of", "rule_shardings"]
