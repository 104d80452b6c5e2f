"""Activation-sparsity hooks the model calls: threshold an activation, record it for calibration.

Thresholds arrive as a variables collection beside "params" (`COLLECTION`), holding at a module's
path, under the name of the site, an array with the activation's channel shape:

  SwiGLU  (dense FFN)  "gate": [F]     the gate activation silu(x W_gate) (CATS / CHESS)
  MoE     (experts)    "gate": [E, F]  the same, per expert
  MLA     (attention)  "q_a":  [M]     the input of the q down-projection only (kv_a keeps the
                                       dense input, so the latent cache stays exact)
                       "o":    [H, D]  the input of the output projection

`threshold` zeroes entries with |a| <= t (so t = 0 changes nothing but exact zeros, which
stay zero). With the collection absent the model is the dense model. While calibrating (the
`STATS` collection mutable) `record` sows the site's pre-threshold |activation| (and, for
"gate", |up projection|) as raw [rows, *channels] float32 arrays; lcjax.sparsity.chess reduces
them into thresholds. The hooks live here so the model needs nothing from lcjax.sparsity.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

COLLECTION = "chess"
STATS = "chess_stats"
COLLECTIONS = (COLLECTION, STATS)


def thresholds_of(module: nn.Module, name: str) -> Optional[Float[Array, "..."]]:
    """The threshold array of site `name` of `module`, or None when not sparsified."""
    if not module.has_variable(COLLECTION, name):
        return None
    return module.get_variable(COLLECTION, name)


def threshold(module: nn.Module, name: str, act: Float[Array, "... *C"]) -> Float[Array, "... *C"]:
    """where(|act| > t, act, 0) with t the site's thresholds (broadcast over leading dims)."""
    t = thresholds_of(module, name)
    if t is None:
        return act
    return jnp.where(jnp.abs(act) > t.astype(act.dtype), act, jnp.zeros_like(act))


def threshold_rows(module: nn.Module, name: str, act: Float[Array, "R F"],
                   expert: Int[Array, "R"]) -> Float[Array, "R F"]:
    """Per-expert thresholds [E, F] picked per row (rows sorted by expert, `expert` [R])."""
    t = thresholds_of(module, name)
    if t is None:
        return act
    t_rf = t[jnp.minimum(expert, t.shape[0] - 1)].astype(act.dtype)
    return jnp.where(jnp.abs(act) > t_rf, act, jnp.zeros_like(act))


def expert_of_rows(group_sizes: Int[Array, "E"], rows: int) -> Int[Array, "R"]:
    """Expert index of each of `rows` rows sorted by expert (E for rows past the groups)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(rows, dtype=jnp.int32), side="right")


def recording(module: nn.Module) -> bool:
    """Whether the caller made the calibration collection mutable (init never records)."""
    return not module.is_initializing() and module.is_mutable_collection(STATS)


def record(module: nn.Module, name: str, act: Float[Array, "..."], kdims: int = 1,
           up: Optional[Float[Array, "..."]] = None,
           group_sizes: Optional[Int[Array, "E"]] = None) -> None:
    """Sow |act| (and |up|) as [rows, *channels] float32; `group_sizes` for rows sorted by expert."""
    if not recording(module):
        return
    channels = act.shape[act.ndim - kdims:]
    value = {"act": jnp.abs(act.reshape((-1,) + channels).astype(jnp.float32))}
    if up is not None:
        value["up"] = jnp.abs(up.reshape((-1,) + channels).astype(jnp.float32))
    if group_sizes is not None:
        value["sizes"] = group_sizes.astype(jnp.int32)
    module.sow(STATS, name, value)
