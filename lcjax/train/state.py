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
from lcjax.lora.adapters import abstract_adapters, adapter_specs, init_adapters
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
    # LoRA adapters (lcjax.lora) when lora.rank > 0: then they alone are trained (opt_state is
    # theirs) and `params` is the frozen base; None otherwise (no leaves: older checkpoints match).
    lora: Any = None


def _init_variables(config: Config, rng: jax.Array) -> dict:
    ids = jnp.zeros((1, min(8, config.data.seq_len)), jnp.int32)
    return LongCatModel(config.model).init(rng, ids)


def abstract_state(config: Config, tx: optax.GradientTransformation) -> tuple[TrainState, TrainState]:
    """(ShapeDtypeStruct state, logical PartitionSpec tree) without allocating anything."""
    boxed = jax.eval_shape(functools.partial(_init_variables, config), jax.random.key(0))
    param_specs = nn.get_partition_spec(boxed["params"])
    params = nn.unbox(boxed["params"])
    bias = nn.unbox(boxed[BIAS_COLLECTION])
    adapters = adapter_specs_tree = None
    trained, trained_specs = params, param_specs  # what the optimizer updates
    if config.lora.enabled:
        adapters = abstract_adapters(params, config.lora, config.model.scan_layers)
        adapter_specs_tree = adapter_specs(adapters, param_specs, config.lora, config.model.scan_layers)
        trained, trained_specs = adapters, adapter_specs_tree
    opt_state = jax.eval_shape(tx.init, trained)
    opt_specs = optax.tree_map_params(tx, lambda _, spec: spec, opt_state, trained_specs,
                                      transform_non_params=lambda _: PartitionSpec())
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                       router_bias=bias, rng=jax.ShapeDtypeStruct((2,), jnp.uint32), lora=adapters)
    specs = TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs,
                       router_bias=jax.tree.map(lambda _: PartitionSpec(), bias), rng=PartitionSpec(),
                       lora=adapter_specs_tree)
    return state, specs


def state_shardings(config: Config, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """NamedShardings of the TrainState under `parallel.rules` (axes that don't divide dropped)."""
    abstract, specs = abstract_state(config, tx)
    if abstract.lora is None:  # no adapters: shard the other fields (a None would read as a leaf)
        fields = ("step", "params", "opt_state", "router_bias", "rng")
        out = logical_shardings({f: getattr(specs, f) for f in fields}, mesh, rules_for(config),
                                abstract={f: getattr(abstract, f) for f in fields})
        return TrainState(**out)
    return logical_shardings(specs, mesh, rules_for(config), abstract=abstract)


def create_optimizer(config: Config) -> optax.GradientTransformation:
    """The update rule of the trained tree: all params, or with LoRA the adapters alone (the
    frozen base gets no gradients and no Adam moments)."""
    boxed = jax.eval_shape(functools.partial(_init_variables, config), jax.random.key(0))
    trained = nn.unbox(boxed["params"])
    if config.lora.enabled:
        trained = abstract_adapters(trained, config.lora, config.model.scan_layers)
    return make_optimizer(trained, config.optimizer, config.model, config.train.steps)


def init_state(config: Config, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """A fresh, sharded TrainState from config.runtime.seed."""
    shardings = state_shardings(config, tx, mesh)

    def init(seed):
        key = jax.random.key(seed)
        init_key, state_key = jax.random.split(key)
        variables = nn.unbox(_init_variables(config, init_key))
        params = scale_init_for_width(variables["params"], config.optimizer, config.model)
        adapters = None
        if config.lora.enabled:
            adapters = init_adapters(jax.random.fold_in(init_key, 1), params, config.lora,
                                     config.model.scan_layers)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params if adapters is None else adapters),
                          router_bias=variables[BIAS_COLLECTION],
                          rng=jax.random.key_data(state_key).astype(jnp.uint32), lora=adapters)

    with mesh:
        return jax.jit(init, out_shardings=shardings)(config.runtime.seed)


def batch_axes(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> tuple[str, ...]:
    """The data-parallel mesh axes: the rules' `batch` axes present in `mesh`."""
    return tuple(a for a in mesh_axes_of("batch", rules) if a in mesh.shape)


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Rows of a [B, S] batch split over every data-parallel axis (the rules' `batch` axes)."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh, rules) or None, None))
