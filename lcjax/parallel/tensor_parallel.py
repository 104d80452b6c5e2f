"""Row-parallel projections whose tensor-parallel all-reduce is Flash Communication.

With heads (attention o_proj) or MLP columns (dense down_proj) split over `tensor`, each device
holds a partial sum of the output; GSPMD would all-reduce it exactly in the activation dtype.
Under `parallel.quantized_tp_comm` the partial product runs in a `shard_map` and is summed with
`quantized_all_reduce` (int8 / int4 / int6 payloads, one all-to-all + one all-gather).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from lcjax.parallel.collectives import quantized_all_reduce
from lcjax.parallel.context import Parallelism, current
from lcjax.parallel.rules import spec_entry


def quantized_tp_axis(par: Optional[Parallelism], w_shape: Sequence[int],
                      w_logical: Sequence[Optional[str]], contract: str) -> Optional[str]:
    """The single mesh axis the contracted dim `contract` is split over, when quantized TP comm
    is on and applies here; else None (the caller runs the plain einsum)."""
    if par is None or par.config.quantized_tp_comm == "none":
        return None
    axes = par.dim_axes(w_shape, w_logical)[list(w_logical).index(contract)]
    return axes[0] if len(axes) == 1 and par.axis_sizes[axes[0]] > 1 else None


def row_parallel_einsum(spec: str, x: Float[Array, "..."], w: Float[Array, "..."],
                        x_logical: Sequence[Optional[str]], w_logical: Sequence[Optional[str]],
                        contract: str, *, par: Optional[Parallelism] = None) -> Float[Array, "..."]:
    """`jnp.einsum(spec, x, w)` whose `contract` dim is split over a mesh axis, reduced quantized.

    x's leading dim is the batch (split as the rules say); the output keeps x's leading dims and
    is replicated over the tensor axis. Falls back to the plain einsum when the context has no
    quantized TP comm or the contracted dim is not split here.
    """
    par = current() if par is None else par
    axis = quantized_tp_axis(par, w.shape, w_logical, contract)
    if axis is None:
        return jnp.einsum(spec, x, w)
    cfg = par.config
    batch = spec_entry(par.dim_axes(x.shape[:1], ("batch",))[0])
    x_spec = P(*[batch if i == 0 else axis if name == contract else None
                 for i, name in enumerate(x_logical)])
    w_spec = P(*[axis if name == contract else None for name in w_logical])
    out_rank = len(spec.split("->")[1])
    out_spec = P(batch, *([None] * (out_rank - 1)))

    def body(x, w):
        partial = jnp.einsum(spec, x, w)
        return quantized_all_reduce(partial, axis, cfg.quantized_tp_comm, cfg.comm_group_size)

    return jax.shard_map(body, mesh=par.mesh, in_specs=(x_spec, w_spec), out_specs=out_spec,
                         check_vma=False)(x, w)
