"""TrainState and its sharded creation: eval_shape -> partition specs -> jit(init, out_shardings).

Unsharded parameters never exist: each device materialises only its shard (STYLE habit 6).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcjax.config import Config
from lcjax.model import BIAS_COLLECTION, LongCatModel
from lcjax.parallel import LOGICAL_AXIS_RULES, logical_shardings, rules_for
from lcjax.parallel.rules import Rules, mesh_axes_of
from lcjax.train.optimizer import make_optimizer, scale_init_for_width


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree of arrays (checkpointed whole)."""

    step: Any  # [] int32
    params: Any
    opt_state: Any
    router_bias: Any  # the non-trainable MoE correction biases
    rng: Any  # [2] uint32 raw key data (orbax-friendly)


def _init_variables(config: Config, rng: jax.Array) -> dict:
    ids = jnp.zeros((1, min(8, config.data.seq_len)), jnp.int32)
    return LongCatModel(config.model).init(rng, ids)


def abstract_state(config: Config, tx: optax.GradientTransformation) -> tuple[TrainState, TrainState]:
    """(ShapeDtypeStruct state, logical PartitionSpec tree) without allocating anything."""
    boxed = jax.eval_shape(functools.partial(_init_variables, config), jax.random.key(0))
    param_specs = nn.get_partition_spec(boxed["params"])
    params = nn.unbox(boxed["params"])
    opt_state = jax.eval_shape(tx.init, params)
    opt_specs = optax.tree_map_params(tx, lambda _, spec: spec, opt_state, param_specs,
                                      transform_non_params=lambda _: PartitionSpec())
    bias = nn.unbox(boxed[BIAS_COLLECTION])
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                       router_bias=bias, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    specs = TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs,
                       router_bias=jax.tree.map(lambda _: PartitionSpec(), bias), rng=PartitionSpec())
    return state, specs


def state_shardings(config: Config, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """NamedShardings of the TrainState under `parallel.rules` (axes that don't divide dropped)."""
    abstract, specs = abstract_state(config, tx)
    return logical_shardings(specs, mesh, rules_for(config), abstract=abstract)


def create_optimizer(config: Config) -> optax.GradientTransformation:
    boxed = jax.eval_shape(functools.partial(_init_variables, config), jax.random.key(0))
    return make_optimizer(nn.unbox(boxed["params"]), config.optimizer, config.model, config.train.steps)


def init_state(config: Config, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """A fresh, sharded TrainState from config.runtime.seed."""
    shardings = state_shardings(config, tx, mesh)

    def init(seed):
        key = jax.random.key(seed)
        init_key, state_key = jax.random.split(key)
        variables = nn.unbox(_init_variables(config, init_key))
        params = scale_init_for_width(variables["params"], config.optimizer, config.model)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          router_bias=variables[BIAS_COLLECTION],
                          rng=jax.random.key_data(state_key).astype(jnp.uint32))

    with mesh:
        return jax.jit(init, out_shardings=shardings)(config.runtime.seed)


def batch_axes(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> tuple[str, ...]:
    """The data-parallel mesh axes: the rules' `batch` axes present in `mesh`."""
    return tuple(a for a in mesh_axes_of("batch", rules) if a in mesh.shape)


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Rows of a [B, S] batch split over every data-parallel axis (the rules' `batch` axes)."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh, rules) or None, None))
