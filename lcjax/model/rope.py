"""Rotary embedding for MLA's decoupled rope dims: interleaved pairs, YaRN optional.

Pair i = (x[2i], x[2i+1]) is rotated by pos * inv_freq[i]. The output uses HF 5.x's
de-interleaved layout [rotated evens | rotated odds] (same for q and k, so q.k is unchanged and
cached k_rope compares equal to HF's).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lcjax.config import RopeConfig, yarn_mscale
from lcjax.model.layers import acc_dtype


def inv_frequencies(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies [dim/2] and the cos/sin attention factor (host, float64)."""
    pos_freqs = rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv_freq = 1.0 / pos_freqs
    if rope.type == "default":
        return inv_freq, 1.0
    # YaRN (HF _compute_yarn_parameters, DeepSeek convention).
    factor = rope.factor
    if rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
                ) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp
    inv_freq = (inv_freq / factor) * (1.0 - extrapolation) + inv_freq * extrapolation
    return inv_freq, attention_factor


def apply_rope(x: Float[Array, "B S H R"], positions: Int[Array, "B S"],
               rope: RopeConfig) -> Float[Array, "B S H R"]:
    """Rotate interleaved pairs of the last dim by position; output de-interleaved (HF layout)."""
    dim = x.shape[-1]
    inv_freq, attention_factor = inv_frequencies(rope, dim)
    # Angles in float32 like HF (positions * inv_freq computed in fp32).
    dt = acc_dtype(x.dtype)
    angles = positions.astype(dt)[..., None] * jnp.asarray(inv_freq, dt)  # [B S R/2]
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    x32 = x.astype(dt)
    even, odd = x32[..., 0::2], x32[..., 1::2]
    out = jnp.concatenate([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return out.astype(x.dtype)
