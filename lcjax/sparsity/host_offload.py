"""Host offload: keep large, sparsely read arrays in host memory and move only the rows a step
reads (lcjax/ops/host_rows.py does the moving inside the jitted step).

Two users: the A²ATS paged latent cache (`offload="host"`: the page pools) and the Flash-Lite
hashed N-gram tables (`offload_ngram_tables`, `python -m lcjax.serve --ngram-offload host`):
each decode step reads K(N-1) rows per token of tables that hold ratio * V rows each.

The host memory is the device's `pinned_host` memory kind (jax 0.10 exposes it on CPU and GPU:
`jax.devices()[0].addressable_memories()`); where it is missing, `to_host` raises a ValueError
listing the kinds there are, so a caller falls back to device memory knowingly.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import numpy as np
from flax import traverse_util

HOST_KIND = "pinned_host"


def host_memory_kind() -> Optional[str]:
    """`pinned_host` if the default device exposes it, else None."""
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    return HOST_KIND if HOST_KIND in kinds else None


def to_host(x: Union[jax.Array, np.ndarray]) -> jax.Array:
    """The array placed in the default device's pinned host memory (ValueError if there is none).
    An array already there comes back as it is, uncopied."""
    if getattr(getattr(x, "sharding", None), "memory_kind", None) == HOST_KIND:
        return x
    if host_memory_kind() is None:
        kinds = [m.kind for m in jax.devices()[0].addressable_memories()]
        raise ValueError(f"host offload needs a '{HOST_KIND}' memory; this device has {kinds}")
    return jax.device_put(x, jax.sharding.SingleDeviceSharding(jax.devices()[0],
                                                               memory_kind=HOST_KIND))


def ngram_table_paths(params: Any) -> list[tuple]:
    """Paths of the hashed N-gram tables (embed/ngram/table_j) in a params tree."""
    flat = traverse_util.flatten_dict(params)
    return [p for p in flat if len(p) >= 2 and p[-2] == "ngram" and str(p[-1]).startswith("table_")]


def offload_ngram_tables(variables: dict) -> dict:
    """Variables with every N-gram table in host memory (projections and the rest unchanged).

    The embedding gathers table rows with lcjax.ops.host_rows.take_rows, so logits are the same
    as with the tables on the device. ValueError if the model has no N-gram tables.
    """
    params = variables["params"]
    paths = ngram_table_paths(params)
    if not paths:
        raise ValueError("ngram offload: the model has no hashed N-gram tables (ngram.enabled=False)")
    flat = traverse_util.flatten_dict(params)
    for p in paths:
        flat[p] = to_host(flat[p])
    return {**variables, "params": traverse_util.unflatten_dict(flat)}


def device_bytes(tree: Any) -> int:
    """Bytes of the tree's arrays held in device memory (host-resident leaves excluded)."""
    return sum(x.nbytes for x in jax.tree.leaves(tree)
               if getattr(getattr(x, "sharding", None), "memory_kind", "device") != HOST_KIND)
