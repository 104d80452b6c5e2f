"""Expert parallelism: routed MoE slots travel to their expert's device by all-to-all and back.

Layout (mesh axis `expert` of size P, E experts, E/P per device): every device routes its own
tokens, packs each routed (token, slot) row into a fixed-capacity send buffer [P, C, M] by
destination device, and one `all_to_all` over `expert` delivers each device the rows for its
experts; they run the local grouped matmuls, a second `all_to_all` returns the outputs, and the
source weights and sums them per token. Zero-expert slots are resolved before dispatch and never
leave their device. Expert-MLP columns split over `tensor` give partial sums, reduced by one psum.

Fixed capacity rather than `lax.ragged_all_to_all`: it runs on every backend (CPU tests, GPU,
TPU) with static shapes. C = slots per device (`expert_capacity_factor=0`) is dropless, hence
exactly the single-device layer, at P times the buffer of a balanced load; c > 0 sets
C = ceil(c * slots / P) and drops the overflow (GShard-style), for memory-bound production runs.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from lcjax.parallel.context import Parallelism
from lcjax.parallel.rules import spec_entry

EXPERT_AXIS = "expert"

# experts_fn(rows [N, M], local expert id [N] (= E_local: empty row), gate, up, down) -> [N, M]
ExpertsFn = Callable[..., jax.Array]


def _to_varying(x, axes: tuple[str, ...]):
    """Mark a replicated value as device-varying over `axes` (pcast; pvary in older jax)."""
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)


def plan(par: Parallelism, x_shape, gate_shape) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(batch axes, expert-MLP axes) when expert parallelism applies here, else None.

    It applies when the rules put `experts` on the `expert` mesh axis (and nothing else), that
    axis has more than one device, and the batch rows are split over it too (each expert rank
    then dispatches distinct tokens).
    """
    if par.axis_sizes.get(EXPERT_AXIS, 1) <= 1:
        return None
    batch_axes = par.dim_axes(x_shape[:1], ("batch",))[0]
    expert_axes, _, mlp_axes = par.dim_axes(gate_shape, ("experts", None, "expert_mlp"))
    if expert_axes != (EXPERT_AXIS,) or EXPERT_AXIS not in batch_axes:
        return None
    return batch_axes, mlp_axes


def capacity(slots: int, devices: int, factor: float) -> int:
    """Rows one device may send another: all its slots (dropless) or ceil(factor*slots/devices)."""
    if factor <= 0:
        return slots
    return max(1, min(slots, math.ceil(factor * slots / devices)))


def dispatch_slots(flat_ids: Int[Array, "N"], num_experts: int, devices: int, experts_per_device: int,
                   cap: int) -> tuple[Int[Array, "N"], Int[Array, "N"], Array]:
    """Destination device, row in its send buffer, and whether each slot is sent.

    Zero-expert slots (id >= num_experts) are never sent; nor are slots past a device's `cap`.
    """
    routed = flat_ids < num_experts
    dest = jnp.where(routed, flat_ids // experts_per_device, devices)  # devices: nowhere
    onehot = (dest[:, None] == jnp.arange(devices)[None, :]).astype(jnp.int32)  # [N, P]
    pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)  # rank within its dest
    return dest, pos, routed & (pos < cap)


def expert_parallel_moe(x: Float[Array, "B S M"], ids: Int[Array, "B S K"], weights: Float[Array, "B S K"],
                        gate: Float[Array, "E M F"], up: Float[Array, "E M F"], down: Float[Array, "E F M"],
                        experts_fn: ExpertsFn, *, par: Parallelism, num_experts: int,
                        batch_axes: tuple[str, ...], mlp_axes: tuple[str, ...]) -> Float[Array, "B S M"]:
    """Routed-expert output of a MoE layer, sharded as x, with all-to-all token dispatch.

    ids >= num_experts are zero-expert slots (their output is added by the caller); weights are
    the router's combine weights. Costs two all-to-alls of [P, C, M] rows per device.
    """
    factor = par.config.expert_capacity_factor
    row_spec = P(spec_entry(batch_axes), None, None)
    w_in, w_out = P(EXPERT_AXIS, None, spec_entry(mlp_axes)), P(EXPERT_AXIS, spec_entry(mlp_axes), None)

    # Weights are replicated over the other batch axes; marking them varying there makes their
    # gradient a psum over those axes (pcast's transpose), as the grouped matmul's VJP expects.
    replicated = tuple(a for a in batch_axes if a != EXPERT_AXIS and a not in mlp_axes)

    def body(x, ids, weights, gate, up, down):
        if replicated:
            gate, up, down = (_to_varying(w, replicated) for w in (gate, up, down))
        if mlp_axes:  # tokens are replicated over the expert-MLP (tensor) axes: likewise
            x = _to_varying(x, mlp_axes)
        b, s, m = x.shape
        k = ids.shape[-1]
        ep, e_local = jax.lax.axis_size(EXPERT_AXIS), gate.shape[0]
        x_tm, flat, wts = x.reshape(b * s, m), ids.reshape(-1), weights.reshape(-1)
        n = flat.shape[0]
        cap = capacity(n, ep, factor)
        token = jnp.arange(n) // k
        dest, pos, keep = dispatch_slots(flat, num_experts, ep, e_local, cap)
        d_idx, p_idx = jnp.where(keep, dest, ep), jnp.where(keep, pos, 0)  # ep: dropped by .set
        send = jnp.zeros((ep, cap, m), x.dtype).at[d_idx, p_idx].set(x_tm[token], mode="drop")
        send_e = jnp.full((ep, cap), e_local, jnp.int32).at[d_idx, p_idx].set(
            flat % e_local, mode="drop")
        recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0)  # [P, C, M]: row j came from device j
        recv_e = jax.lax.all_to_all(send_e, EXPERT_AXIS, 0, 0)
        out = experts_fn(recv.reshape(ep * cap, m), recv_e.reshape(-1), gate, up, down)
        back = jax.lax.all_to_all(out.reshape(ep, cap, m), EXPERT_AXIS, 0, 0)
        got = back[jnp.where(keep, dest, 0), p_idx]  # [N, M]: each slot's expert output
        # Combine in float32 (as the single-device layer), then back to the compute dtype.
        got = got.astype(jnp.float32) * jnp.where(keep, wts, 0.0)[:, None].astype(jnp.float32)
        y = jnp.zeros((b * s, m), jnp.float32).at[token].add(got)
        if mlp_axes:  # expert-MLP columns split over `tensor`: partial sums of the down matmul
            y = jax.lax.psum(y, mlp_axes)
        return y.reshape(b, s, m).astype(x.dtype)

    return jax.shard_map(body, mesh=par.mesh, in_specs=(row_spec, row_spec, row_spec, w_in, w_in, w_out),
                         out_specs=row_spec)(x, ids, weights, gate, up, down)
