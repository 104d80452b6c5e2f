"""Integer Scale (arXiv 2405.14597): integer group scales, one float rescale per output channel.

Float group scales s[g, n] are factored as s = c[n] · t[g, n] with c[n] = max_g s[g, n], so
t ∈ (0, 1], and stored as ŝ[g, n] = round(α · t[g, n]) (int32). The GEMM then accumulates
Σ_g ŝ[g,n] · (Σ_{k∈g} x_q w_q) in int32 and its epilogue is x_scale · acc / α (the kernel's
integer mode), times c[n] (lcjax.ops.quantized_matmul). Normalising by c[n] makes the rounding
error of ŝ independent of the weights' magnitude: |ŝ/α - t| <= 1/(2α).

int32 safety: with |x_q| <= 127, column n's accumulator is bounded by
    127 · Σ_g ŝ[g, n] · Σ_{k∈g} |w_q[k, n]|,
computed exactly from the codes; a layer whose bound reaches 2^31 is refused (naming α and the
largest safe power of two), and alpha="auto" picks that largest power of two (<= 2^16).
"""

from __future__ import annotations

from typing import Union

import jax.numpy as jnp
import numpy as np

from lcjax.quant.quantizers import ACT_QMAX, QTensor, dequantize, unpack_int4

INT32_MAX = 2**31 - 1
MAX_AUTO_EXPONENT = 16


def _check_convertible(qt: QTensor, name: str) -> None:
    if qt.granularity != "group" or qt.alpha is not None or qt.zero is not None:
        raise ValueError(f"{name}: Integer Scale needs symmetric group-wise float scales, got "
                         f"{qt.describe()}")


def _factor(qt: QTensor):
    s = np.asarray(qt.scale, np.float64)  # [*b, G, N]
    c = s.max(axis=-2)  # [*b, N]
    return s / c[..., None, :], c


def accumulator_bound(qt: QTensor, alpha: int) -> np.ndarray:
    """Exact worst-case |int32 accumulator| per column [*b, N] for int8 inputs within ±127."""
    t, _ = _factor(qt)
    s_int = np.round(alpha * t)
    q = np.asarray(qt.q)
    q = np.abs((unpack_int4(q) if qt.bits == 4 else q).astype(np.int64))  # [*b, K, N]
    g = qt.group_size
    absq = q.reshape(q.shape[:-2] + (q.shape[-2] // g, g, q.shape[-1])).sum(axis=-2)  # [*b, G, N]
    return ACT_QMAX * (s_int * absq).sum(axis=-2)


def safe_alpha(qt: QTensor) -> int:
    """Largest power of two α <= 2^16 whose accumulator bound stays below 2^31."""
    for e in range(MAX_AUTO_EXPONENT, -1, -1):
        if accumulator_bound(qt, 2**e).max() <= INT32_MAX:
            return 2**e
    raise ValueError("no power-of-two alpha keeps the int32 accumulator in range")


def to_integer_scale(qt: QTensor, alpha: Union[int, str], name: str = "weight") -> QTensor:
    """The same codes with ŝ = round(α · s / c) int32 scales and c[n] float rescales."""
    _check_convertible(qt, name)
    if alpha == "auto":
        alpha = safe_alpha(qt)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, np.integer)) or alpha <= 0:
        raise ValueError(f"{name}: integer-scale alpha={alpha!r} must be a positive int or 'auto'")
    bound = accumulator_bound(qt, alpha).max()
    if bound > INT32_MAX:
        raise ValueError(f"{name}: integer-scale alpha={alpha} can overflow the int32 accumulator "
                         f"(worst case {bound:.3g} >= 2^31); the largest safe power of two is "
                         f"{safe_alpha(qt)}")
    t, c = _factor(qt)
    return qt.replace(scale=jnp.asarray(np.round(alpha * t), jnp.int32),
                      channel_scale=jnp.asarray(c, jnp.float32), alpha=int(alpha))


def weight_deviation(float_qt: QTensor, int_qt: QTensor, gram=None) -> float:
    """Relative output deviation ||X (Ŵ_int - Ŵ_float)|| / ||X Ŵ_float|| over calibration
    inputs summarised by their Gram matrix Σ x xᵀ [*b, K, K] (identity: weight-space error)."""
    wf = np.asarray(dequantize(float_qt), np.float64)
    wi = np.asarray(dequantize(int_qt), np.float64)
    k, n = float_qt.k, float_qt.n
    wf = wf.reshape(wf.shape[: wf.ndim - len(float_qt.kshape) - len(float_qt.nshape)] + (k, n))
    wi = wi.reshape(wf.shape)
    if gram is None:
        return float(np.linalg.norm(wi - wf) / max(np.linalg.norm(wf), 1e-30))
    h = np.asarray(gram, np.float64)
    if float_qt.smooth is not None:  # Ŵ = diag(s) W sees X / s
        sm = np.asarray(float_qt.smooth, np.float64)
        h = h / (sm[..., :, None] * sm[..., None, :])
    d = wi - wf
    num = np.einsum("...kn,...kj,...jn->...n", d, h, d).sum()
    den = np.einsum("...kn,...kj,...jn->...n", wf, h, wf).sum()
    return float(np.sqrt(max(num, 0.0) / max(den, 1e-30)))
