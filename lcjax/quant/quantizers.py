"""Integer quantizers for weights and activations, and `QTensor`, the quantized weight leaf.

A weight of logical shape [*batch, *kshape, *nshape] (batch: the scanned layer axis L and/or the
expert axis E; kshape: the dims its einsum contracts; nshape: the output dims) is stored as the
matrix [*batch, K, N], K = prod(kshape), N = prod(nshape), the layout `quant_matmul` consumes.

Granularity of weight scales (always along N, the output channel):
  "tensor"  one scale per matrix            scale [*batch]
  "channel" one per output channel          scale [*batch, N]
  "group"   one per (K-group of g, channel) scale [*batch, K//g, N]   (groups along K)
Symmetric: w ≈ s·q, q in [-(2^(b-1)-1), 2^(b-1)-1]. Asymmetric: w ≈ s·(q - z), q in
[-2^(b-1), 2^(b-1)-1] (signed storage of the usual unsigned code minus 2^(b-1)), z integer-valued.
int4 payloads are packed two per int8 along K, low nibble = even k (pallas_kernels.quant_matmul's
`pack_int4` layout).

Activations are int8, symmetric, clipped to ±127 so that |x_q·w_q| bounds are symmetric:
per-token dynamic (scale = max|x_row| / 127) or per-tensor static (a calibrated scale).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

# Weight quantization is offline work: given numpy arrays it runs in numpy (no per-shape XLA
# compiles for each of a model's weights); given jax arrays it runs in jnp (traceable). Both
# follow the same code with the same rounding (half to even) in float32.
HostOrDevice = Union[jax.Array, np.ndarray]


def _xp(*arrays):
    return np if all(isinstance(a, (np.ndarray, np.generic, float, int)) for a in arrays) else jnp

GRANULARITIES = ("tensor", "channel", "group")
ACT_MODES = ("none", "dynamic", "static")  # "none": weight-only (A16)
ACT_QMAX = 127


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


# ---------------------------------------------------------------------------------------------
# int4 packing (the layout of pallas_kernels.quant_matmul.pack_int4)


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
    out = _xp(p).stack([lo, hi], axis=-2)  # [*b, K//2, 2, N]
    return out.reshape(p.shape[:-2] + (2 * p.shape[-2], p.shape[-1]))


# ---------------------------------------------------------------------------------------------
# weights


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a weight code: symmetric ±(2^(b-1)-1), asymmetric [-2^(b-1), 2^(b-1)-1]."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is not supported: expected 4 or 8")
    top = 2 ** (bits - 1) - 1
    return (-top if symmetric else -top - 1), top


def _reduce(fn, w: Float[HostOrDevice, "*b K N"], granularity: str, group_size: Optional[int]):
    """A statistic over each scale's slice: tensor -> [*b], channel -> [*b, N], group -> [*b, G, N]."""
    if granularity == "tensor":
        return fn(w, axis=(-2, -1))
    if granularity == "channel":
        return fn(w, axis=-2)
    k, n = w.shape[-2:]
    return fn(w.reshape(w.shape[:-2] + (k // group_size, group_size, n)), axis=-2)


def _expand_scale(s, granularity: str, group_size: Optional[int]):
    """Stored scale (or zero point) -> broadcastable against [*b, K, N]."""
    if granularity == "group":
        return _xp(s).repeat(s, group_size, axis=-2)
    if granularity == "channel":
        return s[..., None, :]
    return s[..., None, None]


def check_weight_settings(name: str, k: int, bits: int, granularity: str, group_size: Optional[int]):
    """ValueError naming the layer and the setting for an unsupported weight quantization."""
    if bits not in (4, 8):
        raise ValueError(f"{name}: weight bits={bits} is not supported (expected 4 or 8)")
    if granularity not in GRANULARITIES:
        raise ValueError(f"{name}: granularity={granularity!r} is not one of {list(GRANULARITIES)}")
    if granularity == "group":
        if not group_size or group_size <= 0:
            raise ValueError(f"{name}: granularity='group' needs a positive group_size, got {group_size}")
        if k % group_size:
            raise ValueError(f"{name}: group_size={group_size} does not divide the contraction "
                             f"dimension K={k}")
        if bits == 4 and group_size % 2:
            raise ValueError(f"{name}: int4 groups must be even (nibble pairs), got group_size={group_size}")
    elif group_size is not None:
        raise ValueError(f"{name}: group_size={group_size} given with granularity={granularity!r}")
    if bits == 4 and k % 2:
        raise ValueError(f"{name}: int4 packing needs an even contraction dimension, got K={k}")


def weight_scales(w: Float[HostOrDevice, "*b K N"], *, bits: int, granularity: str = "channel",
                  group_size: Optional[int] = None, symmetric: bool = True, clip: Any = 1.0):
    """(scale, zero or None) of `w` [*b, K, N] in the stored granularity.

    Symmetric: s = clip·max|w| / (2^(b-1)-1). Asymmetric: the range [min(w,0), max(w,0)]·clip
    over 2^b - 1 levels, z = qmin - round(lo / s). `clip` is a scalar or per output channel
    [*b, N] (not with "tensor"). All-zero slices get s = 1 (code 0).
    """
    qmin, qmax = qrange(bits, symmetric)
    xp = _xp(w, clip)
    w = w.astype(np.float32)
    clip = xp.asarray(clip, np.float32)
    if clip.ndim and granularity == "tensor":
        raise ValueError("a per-channel clip needs per-channel or per-group scales, not 'tensor'")
    if clip.ndim and granularity == "group":
        clip = clip[..., None, :]  # [*b, 1, N] against [*b, G, N]
    if symmetric:
        amax = _reduce(xp.max, xp.abs(w), granularity, group_size) * clip
        return xp.where(amax > 0, amax / np.float32(qmax), np.float32(1.0)), None
    lo = xp.minimum(_reduce(xp.min, w, granularity, group_size), 0.0) * clip
    hi = xp.maximum(_reduce(xp.max, w, granularity, group_size), 0.0) * clip
    scale = xp.where(hi > lo, (hi - lo) / np.float32(qmax - qmin), np.float32(1.0))
    return scale, np.float32(qmin) - xp.round(lo / scale)


def quantize_values(w: Float[HostOrDevice, "*b K N"], scale, zero, *, bits: int, granularity: str,
                    group_size: Optional[int]) -> Int[HostOrDevice, "*b K N"]:
    """Integer codes (int8 container) of w under given scales: round(w / s) (+ z), clipped."""
    qmin, qmax = qrange(bits, zero is None)
    xp = _xp(w, scale)
    q = xp.round(w.astype(np.float32) / _expand_scale(scale, granularity, group_size))
    if zero is not None:
        q = q + _expand_scale(zero, granularity, group_size)
    return xp.clip(q, qmin, qmax).astype(np.int8)


def quantize_weight(w: Float[HostOrDevice, "..."], *, kdims: int = 1, batch_dims: int = 0, bits: int = 8,
                    granularity: str = "channel", group_size: Optional[int] = None,
                    symmetric: bool = True, clip: Any = 1.0, name: str = "weight") -> QTensor:
    """Quantize a weight of logical shape [*batch, *kshape, *nshape] (kdims contraction dims).

    Returns a weight-only QTensor (act="none", jax arrays); recipes add the activation side.
    `clip` is a scalar or a per-output-channel [*batch, N] range factor (OdysseyLLM clipping).
    numpy input is quantized in numpy, jax input in jnp (same float32 arithmetic).
    """
    batch = tuple(w.shape[:batch_dims])
    kshape = tuple(w.shape[batch_dims: batch_dims + kdims])
    nshape = tuple(w.shape[batch_dims + kdims:])
    k, n = math.prod(kshape), math.prod(nshape)
    check_weight_settings(name, k, bits, granularity, group_size)
    w2 = w.reshape(batch + (k, n))
    scale, zero = weight_scales(w2, bits=bits, granularity=granularity, group_size=group_size,
                                symmetric=symmetric, clip=clip)
    q = quantize_values(w2, scale, zero, bits=bits, granularity=granularity, group_size=group_size)
    q = pack_int4(q) if bits == 4 else q
    return QTensor(q=jnp.asarray(q), scale=jnp.asarray(scale, jnp.float32),
                   zero=None if zero is None else jnp.asarray(zero, jnp.float32), bits=bits,
                   granularity=granularity, group_size=group_size, act="none", kshape=kshape,
                   nshape=nshape)


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
        q = q - _expand_scale(qt.zero, qt.granularity, qt.group_size)
    w = q * _expand_scale(float_scales(qt), qt.granularity, qt.group_size)
    return w.reshape(qt.logical_shape)


def with_activation(qt: QTensor, act: str, *, act_scale=None, smooth=None, name: str = "weight") -> QTensor:
    """Attach the input's quantization: act mode, static scale [*batch], smoothing [*batch, K]."""
    if act not in ACT_MODES:
        raise ValueError(f"{name}: act={act!r} is not one of {list(ACT_MODES)}")
    if act == "static" and act_scale is None:
        raise ValueError(f"{name}: act='static' needs a calibrated act_scale")
    return qt.replace(act=act, act_scale=None if act_scale is None else jnp.asarray(act_scale, jnp.float32),
                      smooth=None if smooth is None else jnp.asarray(smooth, jnp.float32))


# ---------------------------------------------------------------------------------------------
# activations


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


def static_scale(absmax: Float[HostOrDevice, "*b"]) -> Float[HostOrDevice, "*b"]:
    """Per-tensor static scale from a calibrated max|x|: max / 127 (1 if nothing was seen)."""
    xp = _xp(absmax)
    absmax = xp.asarray(absmax, np.float32)
    return xp.where(absmax > 0, absmax / np.float32(ACT_QMAX), np.float32(1.0))


def fake_quant(x: Float[Array, "..."], bits: int = 8) -> Float[Array, "..."]:
    """Quantize-dequantize per token (for error studies)."""
    if bits != 8:
        raise ValueError(f"activation bits={bits} is not supported (int8 activations only)")
    q, s = quantize_per_token(x)
    return q.astype(jnp.float32) * s[..., None]


__all__ = [
    "ACT_MODES", "ACT_QMAX", "GRANULARITIES", "QTensor", "check_weight_settings", "dequantize",
    "fake_quant", "float_scales", "int_values", "is_qtensor", "pack_int4", "qrange",
    "quantize_per_token", "quantize_static", "quantize_values", "quantize_weight", "static_scale",
    "unpack_int4", "weight_scales", "with_activation",
]
