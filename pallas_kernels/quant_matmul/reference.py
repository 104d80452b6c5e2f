"""The definition of quantized matmul ("xla"): int4 packing, the modes, and their math.

Modes (api.py validates and normalises the arguments; scales are float32 unless integer):
  A8, per-channel       y[m,n] = (float(acc[m,n]) * x_scale[m]) * w_scale[n],
                        acc = sum_k x[m,k] w[k,n] in int32                (W8A8, Odyssey W4A8)
  A8, float groups      y[m,n] = (sum_g float(part[g,m,n]) * w_scale[g,n]) * x_scale[m],
                        part[g] = sum_{k in g} x w in int32, the sum over g in order
                        (the float-scale fine-grained W4A8 baseline)
  A8, integer groups    y[m,n] = (float(acc[m,n]) * x_scale[m]) * float32(1 / alpha),
                        acc = sum_g s_int[g,n] * part[g,m,n] in int32     (Integer Scale)
  A16                   y[m,n] = sum_k x[m,k] * (float(w[k,n]) * w_scale[g(k) or -, n]),
                        float32 accumulation (W4A16 / W8A16)
then cast to out_dtype. The integer parts are exact; backends reproduce them bit for bit, and the
per-channel and Integer Scale epilogues too (float32 products in the order written above; 1/alpha
is a product, not a division, whose rounding differs between compilers; a power-of-two alpha
makes it exact).

int32 overflow (techniques.md §2): |x| <= 128 and |w| <= 128 (int8) or 8 (int4), so
  per-channel / float groups:  |acc| <= K * 128 * wmax          (W8A8: K <= 2^17; W4A8: K <= 2^21)
  integer groups:              |acc| <= K * 128 * wmax * max|s_int|
`accumulator_bound` gives that bound; pick alpha (a power of two) so it stays below 2^31.
Past it the int32 accumulator wraps, in the reference as in the kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Int8, Shaped

_HIGHEST = jax.lax.Precision.HIGHEST
INT32_LIMIT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Mode:
    """Which of the four modes a call is (set by api.py from the arguments)."""

    bits: int                   # weight bits, 8 or 4 (4: w is packed, two values per int8)
    a8: bool                    # int8 activations with x_scale (else float activations)
    group_size: int | None      # None: per-channel scales
    integer_scale: bool         # w_scale holds int32 s_int = round(alpha * s); needs a8, groups

    @property
    def name(self) -> str:
        """e.g. "w8a8", "w4a8_int_g128", "w4a8_float_g64", "w4a16_g128"."""
        act = "a8" if self.a8 else "a16"
        if self.group_size is None:
            return f"w{self.bits}{act}"
        kind = "_int" if self.integer_scale else ("_float" if self.a8 else "")
        return f"w{self.bits}{act}{kind}_g{self.group_size}"


# ---- int4 packing ----

def pack_int4(w_q: Int[Array, "*E K N"]) -> Int8[Array, "*E Kp N"]:
    """Two int4 values per int8 along K (the second-to-last axis): packed[..., i, n] =
    (w[..., 2i, n] & 0xF) | (w[..., 2i+1, n] << 4), so the low nibble holds the even k.

    Values must lie in [-8, 7] (not checked: they wrap). K must be even (ValueError otherwise).
    """
    if w_q.shape[-2] % 2:
        raise ValueError(f"pack_int4: K (axis -2) of shape {w_q.shape} must be even")
    w = w_q.astype(jnp.int32)
    packed = (w[..., 0::2, :] & 0xF) | ((w[..., 1::2, :] & 0xF) << 4)
    return jnp.where(packed > 127, packed - 256, packed).astype(jnp.int8)


def unpack_int4(packed: Int8[Array, "*E Kp N"]) -> Int8[Array, "*E K N"]:
    """Inverse of pack_int4, sign-extended: lo = (p << 4) >> 4 (even k), hi = p >> 4 (odd k)."""
    p = packed.astype(jnp.int8)
    lo = jnp.right_shift(jnp.left_shift(p, 4), 4)
    hi = jnp.right_shift(p, 4)
    both = jnp.stack([lo, hi], axis=-2)  # [..., K/2, 2, N]
    return both.reshape(p.shape[:-2] + (2 * p.shape[-2], p.shape[-1]))


def accumulator_bound(k_dim: int, bits: int, max_integer_scale: int = 1) -> int:
    """Worst-case |int32 accumulator| of an A8 product over K (see the module docstring)."""
    wmax = 128 if bits == 8 else 8
    return k_dim * 128 * wmax * max_integer_scale


# ---- the reference ----

def unpacked_weights(w: Int8[Array, "*E Kw N"], bits: int) -> Int8[Array, "*E K N"]:
    return unpack_int4(w) if bits == 4 else w


def group_partials(x: Int8[Array, "M K"], w: Int8[Array, "K N"], group_size: int
                   ) -> Int[Array, "G M N"]:
    """part[g] = x[:, g] @ w[g] in int32, one per K-group."""
    (m, k), n = x.shape, w.shape[1]
    x_mgk = x.reshape(m, k // group_size, group_size)
    w_gkn = w.reshape(k // group_size, group_size, n)
    return jnp.einsum("MGk,GkN->GMN", x_mgk, w_gkn, preferred_element_type=jnp.int32)


def integer_accumulator(x: Int8[Array, "M K"], w: Int8[Array, "Kw N"], *, bits: int,
                        group_size: int | None = None,
                        integer_scale: Int[Array, "G N"] | None = None) -> Int[Array, "M N"]:
    """The int32 accumulator of an A8 mode: sum_k x w, or sum_g s_int[g] * part[g]."""
    w = unpacked_weights(w, bits)
    if integer_scale is None:
        return jax.lax.dot(x, w, preferred_element_type=jnp.int32)
    parts = group_partials(x, w, group_size)
    return jnp.sum(parts * integer_scale.astype(jnp.int32)[:, None, :], axis=0, dtype=jnp.int32)


def quant_matmul_reference(
    x: Shaped[Array, "M K"],
    w: Int8[Array, "Kw N"],
    w_scale: Shaped[Array, "*G N"],
    x_scale: Float[Array, "M"] | None,
    *,
    mode: Mode,
    alpha: float | int | None,
    out_dtype,
) -> Shaped[Array, "M N"]:
    """y = x @ dequant(w) in `mode` (see the module docstring); arguments as api.py normalises
    them: x_scale float32 [M] (None for A16), w_scale [N] or [K/g, N]."""
    if not mode.a8:
        w_f = unpacked_weights(w, mode.bits).astype(jnp.float32)
        if mode.group_size is None:
            w_f = w_f * w_scale.astype(jnp.float32)[None, :]
        else:
            w_f = w_f * jnp.repeat(w_scale.astype(jnp.float32), mode.group_size, axis=0)
        y = jax.lax.dot(x.astype(jnp.float32), w_f, precision=_HIGHEST,
                        preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
    xs = x_scale.astype(jnp.float32)[:, None]
    if mode.group_size is None:
        acc = integer_accumulator(x, w, bits=mode.bits)
        y = (acc.astype(jnp.float32) * xs) * w_scale.astype(jnp.float32)[None, :]
    elif mode.integer_scale:
        acc = integer_accumulator(x, w, bits=mode.bits, group_size=mode.group_size,
                                  integer_scale=w_scale)
        y = acc.astype(jnp.float32) * xs * jnp.float32(1 / alpha)
    else:
        parts = group_partials(x, unpacked_weights(w, mode.bits), mode.group_size)
        scaled = parts.astype(jnp.float32) * w_scale.astype(jnp.float32)[:, None, :]
        acc_f = jax.lax.fori_loop(0, scaled.shape[0], lambda g, a: a + scaled[g],
                                  jnp.zeros(scaled.shape[1:], jnp.float32))  # in order over g
        y = acc_f * xs
    return y.astype(out_dtype)


def expert_of_rows(group_sizes: Int[Array, "E"], num_rows: int) -> Int[Array, "M"]:
    """The expert of each row (rows sorted by expert); E for rows past sum(group_sizes)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right")


def quant_gmm_reference(
    x: Shaped[Array, "M K"],
    w: Int8[Array, "E Kw N"],
    group_sizes: Int[Array, "E"],
    w_scale: Shaped[Array, "E *G N"],
    x_scale: Float[Array, "M"] | None,
    *,
    mode: Mode,
    alpha: float | int | None,
    out_dtype,
    ragged_dot: Callable = jax.lax.ragged_dot,
) -> Shaped[Array, "M N"]:
    """Per expert e, on e's rows: quant_matmul_reference(x[rows], w[e], w_scale[e], ...); rows
    past sum(group_sizes) give 0. Integer parts through `ragged_dot` in int32 (default
    `jax.lax.ragged_dot`; the "segments" backend passes its row-tiled grouped matmul)."""
    num_rows, num_experts = x.shape[0], w.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    expert = expert_of_rows(sizes, num_rows)
    valid = (expert < num_experts)[:, None]
    ws_rows = w_scale[jnp.minimum(expert, num_experts - 1)]  # [M, N] or [M, G, N]
    w_full = unpacked_weights(w, mode.bits)  # [E, K, N]
    if not mode.a8:
        w_f = w_full.astype(jnp.float32)
        if mode.group_size is None:
            w_f = w_f * w_scale.astype(jnp.float32)[:, None, :]
        else:
            w_f = w_f * jnp.repeat(w_scale.astype(jnp.float32), mode.group_size, axis=1)
        y = ragged_dot(x.astype(jnp.float32), w_f, sizes, precision=_HIGHEST,
                               preferred_element_type=jnp.float32)
        return jnp.where(valid, y, 0.0).astype(out_dtype)
    xs = x_scale.astype(jnp.float32)[:, None]
    if mode.group_size is None:
        acc = ragged_dot(x, w_full, sizes, preferred_element_type=jnp.int32)
        y = (acc.astype(jnp.float32) * xs) * ws_rows.astype(jnp.float32)
        return jnp.where(valid, y, 0.0).astype(out_dtype)
    g = mode.group_size
    num_k_groups = x.shape[1] // g
    x_gmk = x.reshape(num_rows, num_k_groups, g).swapaxes(0, 1)
    w_gekn = w_full.reshape(num_experts, num_k_groups, g, -1).swapaxes(0, 1)
    parts = jax.lax.map(lambda ab: ragged_dot(ab[0], ab[1], sizes,
                                                      preferred_element_type=jnp.int32),
                        (x_gmk, w_gekn))  # [G, M, N] (ragged_dot has no batching rule here)
    ws_gmn = ws_rows.swapaxes(0, 1)
    if mode.integer_scale:
        acc = jnp.sum(parts * ws_gmn.astype(jnp.int32), axis=0, dtype=jnp.int32)
        y = acc.astype(jnp.float32) * xs * jnp.float32(1 / alpha)
    else:
        scaled = parts.astype(jnp.float32) * ws_gmn.astype(jnp.float32)
        acc_f = jax.lax.fori_loop(0, num_k_groups, lambda i, a: a + scaled[i],
                                  jnp.zeros(scaled.shape[1:], jnp.float32))
        y = acc_f * xs
    return jnp.where(valid, y, 0.0).astype(out_dtype)
