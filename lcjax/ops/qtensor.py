"""`QTensor`, the quantized weight leaf the model runs, and the arithmetic the model needs of it.

A weight of logical shape [*batch, *kshape, *nshape] (batch: the scanned layer axis L and/or the
expert axis E; kshape: the dims its einsum contracts; nshape: the output dims) is stored as the
matrix [*batch, K, N], K = prod(kshape), N = prod(nshape), the layout `quant_matmul` consumes.

Granularity of weight scales (always along N, the output channel):
  "tensor"  one scale per matrix            scale [*batch]
  "channel" one per output channel          scale [*batch, N]
  "group"   one per (K-group of g, channel) scale [*batch, K//g, N]   (groups along K)
Symmetric: w ≈ s·q. Asymmetric: w ≈ s·(q - z), z integer-valued. int4 payloads are packed two
per int8 along K, low nibble = even k (pallas_kernels.quant_matmul's `pack_int4` layout).
Activations are int8, symmetric, clipped to ±127 (per-token dynamic or per-tensor static).

Producing QTensors (scales, rounding, recipes) is offline work in lcjax.quant; this module holds
only what running one takes, so the model and lcjax.ops need nothing from lcjax.quant.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

# Offline weight code runs in numpy on host arrays (no per-shape XLA compile per weight) and in
# jnp on jax arrays (traceable): the same code, the same rounding (half to even) in float32.
HostOrDevice = Union[jax.Array, np.ndarray]
ACT_QMAX = 127


def array_module(*arrays):
    """numpy when every argument is a host value, else jax.numpy."""
    return np if all(isinstance(a, (np.ndarray, np.generic, float, int)) for a in arrays) else jnp


@flax.struct.dataclass
class QTensor:
    """A quantized weight and the recipe for its input; a pytree whose array leaves scan and jit.

    Fields are typed `Any` (shapes in comments) because flax's nn.scan slices the leading layer
    axis off every leaf, so one class describes stacked and per-layer weights.
    """

    q: Any  # int8 [*batch, K, N]; bits=4: packed [*batch, K//2, N]
    scale: Any  # float32 per granularity (see module doc); integer scale: int32 ŝ [*batch, K//g, N]
    zero: Any = None  # float32 like `scale` (asymmetric zero point, integer-valued) or None
    channel_scale: Any = None  # float32 [*batch, N]: integer scale's float rescale c[n]
    smooth: Any = None  # float32 [*batch, K]: the input is divided by it (SmoothQuant / LAE)
    act_scale: Any = None  # float32 [*batch]: static per-tensor input scale (act="static");
    #                        0 = this slice quantizes its input per token (FPTQ policy, per layer)
    bits: int = flax.struct.field(pytree_node=False, default=8)
    granularity: str = flax.struct.field(pytree_node=False, default="channel")
    group_size: Optional[int] = flax.struct.field(pytree_node=False, default=None)
    act: str = flax.struct.field(pytree_node=False, default="none")
    alpha: Optional[int] = flax.struct.field(pytree_node=False, default=None)  # integer-scale amplifier
    kshape: tuple = flax.struct.field(pytree_node=False, default=())
    nshape: tuple = flax.struct.field(pytree_node=False, default=())

    @property
    def k(self) -> int:
        return math.prod(self.kshape)

    @property
    def n(self) -> int:
        return math.prod(self.nshape)

    @property
    def batch_shape(self) -> tuple:
        return tuple(self.q.shape[:-2])

    @property
    def logical_shape(self) -> tuple:
        return self.batch_shape + tuple(self.kshape) + tuple(self.nshape)

    def describe(self) -> str:
        """Short text of the static settings, for error messages and tables."""
        parts = [f"int{self.bits}", self.granularity + (f"(g={self.group_size})" if self.group_size else ""),
                 f"act={self.act}"]
        if self.zero is not None:
            parts.append("asym")
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha}")
        if self.smooth is not None:
            parts.append("smoothed")
        return " ".join(parts)


def is_qtensor(x: Any) -> bool:
    return isinstance(x, QTensor)


def pack_int4(q: Int[HostOrDevice, "*b K N"]) -> Int[HostOrDevice, "*b K2 N"]:
    """Values in [-8, 7] along K -> int8 [*b, K//2, N]: low nibble = even k, high nibble = odd k."""
    if q.shape[-2] % 2:
        raise ValueError(f"pack_int4: K={q.shape[-2]} must be even (two nibbles per int8 along K)")
    q = q.astype(np.int8)
    lo, hi = q[..., 0::2, :], q[..., 1::2, :]
    return ((hi << 4) | (lo & 0x0F)).astype(np.int8)


def unpack_int4(p: Int[HostOrDevice, "*b K2 N"]) -> Int[HostOrDevice, "*b K N"]:
    """Inverse of pack_int4 with sign extension: lo = (p << 4) >> 4, hi = p >> 4 (arithmetic)."""
    p = p.astype(np.int8)
    lo = (p << 4) >> 4
    hi = p >> 4
    out = array_module(p).stack([lo, hi], axis=-2)  # [*b, K//2, 2, N]
    return out.reshape(p.shape[:-2] + (2 * p.shape[-2], p.shape[-1]))


def expand_scale(s, granularity: str, group_size: Optional[int]):
    """Stored scale (or zero point) -> broadcastable against [*b, K, N]."""
    if granularity == "group":
        return array_module(s).repeat(s, group_size, axis=-2)
    if granularity == "channel":
        return s[..., None, :]
    return s[..., None, None]


def int_values(qt: QTensor) -> Int[Array, "*b K N"]:
    """The unpacked integer codes [*batch, K, N] (int8 container)."""
    return unpack_int4(qt.q) if qt.bits == 4 else qt.q


def float_scales(qt: QTensor) -> Float[Array, "..."]:
    """Scales as float32 in the stored granularity; integer scales give c[n]·ŝ / α."""
    if qt.alpha is None:
        return qt.scale.astype(jnp.float32)
    return qt.scale.astype(jnp.float32) / qt.alpha * qt.channel_scale[..., None, :]


def dequantize(qt: QTensor) -> Float[Array, "..."]:
    """float32 weight of the logical shape [*batch, *kshape, *nshape] (smoothing not undone)."""
    q = int_values(qt).astype(jnp.float32)
    if qt.zero is not None:
        q = q - expand_scale(qt.zero, qt.granularity, qt.group_size)
    w = q * expand_scale(float_scales(qt), qt.granularity, qt.group_size)
    return w.reshape(qt.logical_shape)


def quantize_per_token(x: Float[Array, "*t K"]) -> tuple[Int[Array, "*t K"], Float[Array, "*t"]]:
    """Dynamic symmetric int8 per row: s = max|x_row| / 127 (1 for an all-zero row)."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / ACT_QMAX, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None]), -ACT_QMAX, ACT_QMAX).astype(jnp.int8)
    return q, scale


def quantize_static(x: Float[Array, "*t K"], scale: Float[Array, "*s"]) -> Int[Array, "*t K"]:
    """Static symmetric int8 with a calibrated scale (broadcast against x[..., 0]); clips outliers."""
    s = jnp.asarray(scale, jnp.float32)[..., None]
    return jnp.clip(jnp.round(x.astype(jnp.float32) / s), -ACT_QMAX, ACT_QMAX).astype(jnp.int8)


__all__ = [
    "ACT_QMAX", "HostOrDevice", "QTensor", "array_module", "dequantize", "expand_scale",
    "float_scales", "int_values", "is_qtensor", "pack_int4", "quantize_per_token",
    "quantize_static", "unpack_int4",
]
