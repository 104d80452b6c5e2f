"""Integer quantizers for weights (offline: scales, rounding, clipping) and activations.

The stored layout and the runtime side (`QTensor`, `dequantize`, int4 packing, per-token and
static int8 activations) live in lcjax.ops.qtensor, which the model uses; they are re-exported
here. Symmetric weights: q in [-(2^(b-1)-1), 2^(b-1)-1]. Asymmetric: q in [-2^(b-1), 2^(b-1)-1]
(signed storage of the usual unsigned code minus 2^(b-1)), z integer-valued. Activations are
int8, symmetric, clipped to ±127 so that |x_q·w_q| bounds are symmetric.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lcjax.ops.qtensor import (ACT_QMAX, HostOrDevice, QTensor, array_module, dequantize,
                               expand_scale, float_scales, int_values, is_qtensor, pack_int4,
                               quantize_per_token, quantize_static, unpack_int4)

GRANULARITIES = ("tensor", "channel", "group")
ACT_MODES = ("none", "dynamic", "static")  # "none": weight-only (A16)


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
    xp = array_module(w, clip)
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
    xp = array_module(w, scale)
    q = xp.round(w.astype(np.float32) / expand_scale(scale, granularity, group_size))
    if zero is not None:
        q = q + expand_scale(zero, granularity, group_size)
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


def with_activation(qt: QTensor, act: str, *, act_scale=None, smooth=None, name: str = "weight") -> QTensor:
    """Attach the input's quantization: act mode, static scale [*batch], smoothing [*batch, K]."""
    if act not in ACT_MODES:
        raise ValueError(f"{name}: act={act!r} is not one of {list(ACT_MODES)}")
    if act == "static" and act_scale is None:
        raise ValueError(f"{name}: act='static' needs a calibrated act_scale")
    return qt.replace(act=act, act_scale=None if act_scale is None else jnp.asarray(act_scale, jnp.float32),
                      smooth=None if smooth is None else jnp.asarray(smooth, jnp.float32))


# ---------------------------------------------------------------------------------------------
# activations (per-token and static int8: lcjax.ops.qtensor)


def static_scale(absmax: Float[HostOrDevice, "*b"]) -> Float[HostOrDevice, "*b"]:
    """Per-tensor static scale from a calibrated max|x|: max / 127 (1 if nothing was seen)."""
    xp = array_module(absmax)
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
