"""Logical axis names -> mesh axes: the one rule table of the project (DESIGN principle 3).

Flax resolves rules in order and uses a mesh axis at most once per array, so an activation
[batch, length, embed] puts batch on (data, fsdp) and leaves embed unsharded, while a weight
[embed, mlp] is split over fsdp x tensor.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from jax.sharding import Mesh

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    # N-gram tables have odd row counts (M_j = ratio*V + 2j + 1), which jit cannot split evenly;
    # they stay replicated until the tables are stored padded to a shard multiple.
    ("ngram_rows", None),
    ("q_lora", None),
    ("kv_lora", None),
    ("head_dim", None),
    ("ngram_dim", None),
)


def logical_shardings(logical_specs: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs (from `nn.get_partition_spec`)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
