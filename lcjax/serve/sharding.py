"""One serving engine over a host's devices: the mesh, and where params and engine state live.

Parameters are placed by the rule table (`parallel.rules`, configs/rules) from the logical axis
names the model declares where they are born; a quantized weight (`QTensor`, stored as the
matrix [*batch, K, N] of a weight [*batch, *k, *n]) takes the split of its logical shape's
first contraction dim for K and first output dim for N, when that split is a split of the whole
flattened dim. Engine state (the paged latent pools, LoZA rings, per-slot counts) is replicated:
the MLA latent is shared by every head, so each tensor-parallel device reads the whole pool
(as vLLM / SGLang keep the MLA cache under TP), and rows gathered by slot index never cross
devices. Step inputs and outputs are replicated too; scheduling stays on the host.

The serving mesh defaults to one device (`mesh.data=1`); sizes whose product is below the
device count use the first devices, so `mesh.tensor=2` serves on two.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcjax.config import MeshConfig, ModelConfig, ParallelConfig
from lcjax.model import LongCatModel
from lcjax.ops.qtensor import QTensor
from lcjax.parallel import Parallelism, load_rules, make_mesh, use_parallelism
from lcjax.parallel.rules import axis_tuple, spec_entry


def serving_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The mesh of `cfg` over all devices, or over the first prod(sizes) when no axis is -1
    and the product is smaller (ValueError when it is larger)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [s * d for s, d in zip(cfg.ici_sizes, cfg.dcn_sizes)]
    if -1 not in sizes and math.prod(sizes) < len(devices):
        devices = devices[: math.prod(sizes)]
    return make_mesh(cfg, devices)


def expert_weights_quantized(variables: Any) -> bool:
    """True when the routed experts' weights are QTensors (expert all-to-all runs float ones)."""
    moe = variables.get("params", {}).get("layers", {}).get("moe", {})
    return isinstance(moe.get("gate"), QTensor)


def parallelism(mesh: Mesh, parallel: ParallelConfig, variables: Any = None) -> Parallelism:
    """The Parallelism the engine traces its steps under. With quantized expert weights,
    `expert_dispatch=auto` becomes `gspmd` (all-to-all dispatch runs float experts only)."""
    if variables is not None and parallel.expert_dispatch == "auto" and expert_weights_quantized(variables):
        parallel = dataclasses.replace(parallel, expert_dispatch="gspmd")
    return Parallelism(mesh=mesh, rules=load_rules(parallel.rules), config=parallel)


def _flat_axes(dims: Sequence[int], axes: Sequence[tuple[str, ...]], stored: int,
               sizes: dict[str, int]) -> tuple[str, ...]:
    """Mesh axes of a dim stored flattened from `dims`: the first dim's split, when the others
    are whole and the stored size (packed / grouped) divides evenly."""
    if not dims or any(axes[1:]):
        return ()
    split = math.prod(sizes[a] for a in axes[0])
    return axes[0] if split > 1 and stored % split == 0 else ()


def qtensor_specs(qt: QTensor, logical: Sequence[Optional[str]], par: Parallelism) -> QTensor:
    """PartitionSpecs for each array field of a QTensor whose weight has these logical names."""
    shape = qt.logical_shape
    names = tuple(logical) + (None,) * (len(shape) - len(logical))
    dims = [axis_tuple(s) for s in tuple(par.spec(shape, names)) + (None,) * len(shape)][: len(shape)]
    nb, nk = len(qt.batch_shape), len(qt.kshape)
    batch = dims[:nb]
    sizes = par.axis_sizes

    def k_axes(stored):
        return _flat_axes(qt.kshape, dims[nb: nb + nk], stored, sizes)

    def n_axes(stored):
        return _flat_axes(qt.nshape, dims[nb + nk:], stored, sizes)

    def spec(arr, tail):
        if arr is None:
            return None
        return PartitionSpec(*(spec_entry(a) for a in batch[: arr.ndim - len(tail)]), *tail)

    q_k, q_n = qt.q.shape[-2:]

    def scale_spec(arr):  # tensor [*b], channel [*b, N], group [*b, K//g, N]
        if arr is None or arr.ndim == nb:
            return spec(arr, ())
        if arr.ndim == nb + 1:
            return spec(arr, (spec_entry(n_axes(arr.shape[-1])),))
        return spec(arr, (spec_entry(k_axes(arr.shape[-2])), spec_entry(n_axes(arr.shape[-1]))))

    smooth = None if qt.smooth is None else spec(qt.smooth, (spec_entry(k_axes(qt.smooth.shape[-1])),))
    channel = (None if qt.channel_scale is None
               else spec(qt.channel_scale, (spec_entry(n_axes(qt.channel_scale.shape[-1])),)))
    return qt.replace(q=spec(qt.q, (spec_entry(k_axes(q_k)), spec_entry(n_axes(q_n)))),
                      scale=scale_spec(qt.scale), zero=scale_spec(qt.zero), channel_scale=channel,
                      smooth=smooth, act_scale=spec(qt.act_scale, ()))


def variable_shardings(cfg: ModelConfig, variables: Any, par: Parallelism) -> Any:
    """NamedShardings for `variables` ({"params", "router_bias"}; float or QTensor leaves) from
    the logical names the model declares, resolved by the rule table on the mesh; any other
    collection (LoRA adapters) replicated."""
    ids = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(LongCatModel(cfg).init, jax.random.key(0), ids)
    # Collections init does not make (LoRA adapters: rank-r, small) are replicated.
    logical = {k: (nn.get_partition_spec(boxed[k]) if k in boxed
                   else jax.tree.map(lambda _: PartitionSpec(), variables[k]))
               for k in variables}

    def one(names, leaf):
        if names is None:
            names = PartitionSpec()
        if isinstance(leaf, QTensor):
            specs = qtensor_specs(leaf, tuple(names), par)
            return jax.tree.map(lambda s: NamedSharding(par.mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, PartitionSpec))
        padded = tuple(names) + (None,) * (leaf.ndim - len(names))
        return NamedSharding(par.mesh, par.spec(leaf.shape, padded))

    return jax.tree.map(one, logical, variables,
                        is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (engine state, step inputs and outputs)."""
    return NamedSharding(mesh, PartitionSpec())


def per_device_bytes(tree: Any) -> int:
    """Bytes the first device holds of a tree of placed arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


class ShardedStep:
    """A jitted engine step with in/out shardings, traced under the engine's parallelism (the
    model reads its rule table and settings while tracing). Called like the plain function;
    its static settings come as keyword arguments (one jitted function per setting)."""

    def __init__(self, fn, par: Parallelism, variable_sharding: Any, *, num_args: int,
                 donate_argnums: Sequence[int] = ()):
        self.fn, self.par = fn, par
        rep = replicated(par.mesh)
        # Positional args: variables, then engine state and step inputs (all replicated).
        self._kwargs = dict(in_shardings=(variable_sharding,) + (rep,) * (num_args - 1),
                            out_shardings=rep, donate_argnums=tuple(donate_argnums))
        self._jitted: dict = {}

    def _get(self, static: dict):
        key = tuple(sorted(static.items()))
        if key not in self._jitted:
            self._jitted[key] = jax.jit(functools.partial(self.fn, **static), **self._kwargs)
        return self._jitted[key]

    def _context(self):
        return use_parallelism(self.par.mesh, self.par.config, self.par.rules)

    def __call__(self, *args, **static):
        with self._context():
            return self._get(static)(*args)

    def lower(self, *args, **static):
        """`jax.jit(...).lower` under the same context (for HLO inspection)."""
        with self._context():
            return self._get(static).lower(*args)


def place(cfg: ModelConfig, variables: Any, state: Any, par: Parallelism) -> tuple[Any, Any, Any]:
    """(variables placed by the rules, state replicated, the variables' shardings)."""
    shardings = variable_shardings(cfg, variables, par)
    if jax.process_count() > 1:  # a mesh over several processes: each puts its own shards
        from lcjax.serve.multihost import put_global

        return (put_global(variables, shardings), put_global(state, replicated(par.mesh)),
                shardings)
    return (jax.device_put(variables, shardings), jax.device_put(state, replicated(par.mesh)),
            shardings)


def compiled_decode_text(engine, rows: int) -> str:
    """The compiled HLO of `engine`'s decode step (or speculative round) for `rows` rows, e.g.
    for `lcjax.parallel.collective_bytes`: the bytes one device sends per step."""
    import numpy as np

    k = engine.engine_config.num_speculative_tokens
    inp = engine._inputs([], rows, np.zeros((rows, 1), np.int32), [], [], [])
    step, static = (engine._spec, {"num_draft": k}) if k else (engine._decode, {})
    return step.lower(engine.variables, engine.state, inp, **static).compile().as_text()
