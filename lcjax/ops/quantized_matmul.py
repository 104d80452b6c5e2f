"""Model-facing weight matmuls: float weights exactly as before, `QTensor`s through int GEMMs.

`einsum(spec, x, w, dtype)` is `jnp.einsum(spec, x, w.astype(dtype))` for a float weight (the
model's float path is unchanged, bit for bit). For a QTensor it quantizes the input as the tensor
says and calls `pallas_kernels.quant_matmul.quant_matmul`:

  act="dynamic"  per-token int8, s_x[m] = max|x[m]| / 127
  act="static"   per-tensor int8 with the calibrated scale (values beyond it clip); a scale of
                 0 (a layer of a stacked tensor that FPTQ's policy leaves dynamic) means
                 per-token, so one static tensor type serves a per-layer policy under nn.scan
  act="none"     weight-only (A16): the kernel dequantizes the weights
  smooth         x / s before quantizing (SmoothQuant / FPTQ's LAE; W was multiplied by s). Not
                 folded into the preceding RMSNorm: that norm's output also feeds the float
                 router (and both MLA down-projections), and the division fuses into the
                 absmax/round pass XLA already makes over x, so it costs no extra memory pass.
  channel_scale  Integer Scale's float rescale c[n], applied after the kernel's
                 x_scale · acc / α epilogue (the kernel API has no per-channel float there).
  zero           asymmetric weights: the kernel computes x·(s·q); the zero-point term
                 Σ_g (Σ_{k∈g} x̂_k) · s_g z_g is subtracted here (x̂ = the dequantized input).

`grouped(x, w, group_sizes, dtype)` is the MoE variant over `quant_gmm` (per-expert weights,
scales, static scales and smoothing, picked per row).
"""

from __future__ import annotations

from typing import Optional, Union

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from lcjax.ops.grouped_matmul import grouped_matmul
from lcjax.ops.qtensor import QTensor, dequantize, quantize_per_token, quantize_static
from pallas_kernels.quant_matmul import quant_gmm, quant_matmul

__all__ = ["einsum", "grouped", "qdot", "weight_as"]

Weight = Union[Float[Array, "..."], QTensor]


def weight_as(w: Weight, dtype) -> Float[Array, "..."]:
    """The weight as a float array of `dtype` (a QTensor is dequantized, smoothing kept in W)."""
    if isinstance(w, QTensor):
        return dequantize(w).astype(dtype)
    return w.astype(dtype)


def einsum(spec: str, x: Float[Array, "..."], w: Weight, dtype, *,
           implementation: Optional[str] = None) -> Float[Array, "..."]:
    """jnp.einsum(spec, x, w) in `dtype`; for a QTensor, x's trailing dims must be its kshape."""
    if not isinstance(w, QTensor):
        return jnp.einsum(spec, x, w.astype(dtype))
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    contracted = [c for c in rhs if c not in out]
    if len(contracted) != len(w.kshape) or lhs[len(lhs) - len(contracted):] != "".join(contracted):
        raise ValueError(f"quantized einsum {spec!r}: the contracted dims must be x's trailing "
                         f"dims and match the QTensor's kshape {w.kshape}")
    return qdot(x, w, out_dtype=dtype, implementation=implementation)


def qdot(x: Float[Array, "..."], w: QTensor, *, out_dtype=jnp.float32,
         implementation: Optional[str] = None) -> Float[Array, "..."]:
    """x [..., *kshape] @ w -> [..., *nshape] through quant_matmul (w has no batch dims)."""
    kd = len(w.kshape)
    if w.batch_shape:
        raise ValueError(f"qdot: QTensor with batch dims {w.batch_shape} (stacked layers or "
                         "experts) needs nn.scan slicing or `grouped`")
    if tuple(x.shape[x.ndim - kd:]) != tuple(w.kshape):
        raise ValueError(f"qdot: x shape {x.shape} does not end in the weight's contraction "
                         f"dims {w.kshape}")
    lead = x.shape[: x.ndim - kd]
    xk = x.reshape(-1, w.k)
    xq, xs, x_hat = _quantize_input(xk, w, w.smooth, w.act_scale)
    y = quant_matmul(xq, w.q, w_scale=_kernel_scale(w), x_scale=xs, bits=w.bits,
                     group_size=w.group_size, alpha=w.alpha, out_dtype=jnp.float32,
                     implementation=implementation)
    if w.channel_scale is not None:
        y = y * w.channel_scale
    if w.zero is not None:
        y = y - _zero_term(x_hat, w, w.scale * w.zero)
    return y.reshape(lead + tuple(w.nshape)).astype(out_dtype)


def grouped(x: Float[Array, "R K"], w: Weight, group_sizes: Int[Array, "E"], dtype, *,
            implementation: Optional[str] = None) -> Float[Array, "R N"]:
    """Rows sorted by expert times per-expert weights [E, K, N]; rows past the groups give 0."""
    if not isinstance(w, QTensor):
        return grouped_matmul(x, w.astype(dtype), group_sizes)
    if len(w.batch_shape) != 1 or len(w.kshape) != 1 or x.shape[-1] != w.k:
        raise ValueError(f"grouped: x {x.shape} and QTensor {w.logical_shape} do not match "
                         "[R, K] x [E, K, N]")
    e = w.batch_shape[0]
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(x.shape[0], dtype=jnp.int32),
                                          side="right"), e - 1)  # [R]
    smooth = None if w.smooth is None else w.smooth[expert]  # [R, K]
    act_scale = None if w.act_scale is None else w.act_scale[expert]  # [R]
    xq, xs, x_hat = _quantize_input(x, w, smooth, act_scale)
    y = quant_gmm(xq, w.q, group_sizes, w_scale=_kernel_scale(w), x_scale=xs, bits=w.bits,
                  group_size=w.group_size, alpha=w.alpha, out_dtype=jnp.float32,
                  implementation=implementation)
    if w.channel_scale is not None:
        y = y * w.channel_scale[expert]
    if w.zero is not None:
        y = y - _zero_term(x_hat, w, (w.scale * w.zero)[expert])
    return y.astype(dtype)


def _quantize_input(xk, w: QTensor, smooth, act_scale):
    """(kernel x, kernel x_scale, dequantized x̂ for the zero-point term) per the act mode."""
    x32 = xk.astype(jnp.float32)
    if smooth is not None:
        x32 = x32 / smooth
    if w.act == "none":
        x_in = x32 if smooth is not None else xk
        return x_in, None, x32
    if w.act == "dynamic":
        xq, xs = quantize_per_token(x32)
    else:  # static; a zero scale marks a layer (or expert) the FPTQ policy sends to per-token
        _, dynamic = quantize_per_token(x32)
        xs = jnp.where(act_scale > 0, act_scale, dynamic)
        xq = quantize_static(x32, xs)
    x_hat = None if w.zero is None else xq.astype(jnp.float32) * xs[..., None]
    return xq, xs, x_hat


def _kernel_scale(w: QTensor):
    """Stored scales in the kernel's layout: per-tensor ones broadcast to per-channel [.., N]."""
    if w.granularity == "tensor":
        return jnp.broadcast_to(w.scale[..., None], w.scale.shape + (w.n,)).astype(jnp.float32)
    return w.scale


def _zero_term(x_hat: Float[Array, "R K"], w: QTensor, sz) -> Float[Array, "R N"]:
    """Σ_g (Σ_{k∈g} x̂[r,k]) · (s·z)[g,n]; sz per row ([R, ...]) for experts, else shared."""
    r = x_hat.shape[0]
    groups = w.k // w.group_size if w.granularity == "group" else 1
    xsum = jnp.sum(x_hat.reshape(r, groups, -1), axis=-1)  # [R, G]
    if w.granularity == "tensor":
        sz = sz[..., None]  # [.., 1] -> broadcast over N
    if w.granularity != "group":
        sz = sz[..., None, :]  # [.., 1, N]
    if sz.ndim == 3:  # per row
        return jnp.einsum("RG,RGN->RN", xsum, jnp.broadcast_to(sz, (r, groups, w.n)))
    return xsum @ jnp.broadcast_to(sz, (groups, w.n))
