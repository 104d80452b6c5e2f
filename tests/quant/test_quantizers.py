"""Quantizers against float64 numpy: codes, round trips, error bounds, packing layout."""

import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.quant.quantizers import (dequantize, int_values, pack_int4, quantize_per_token,
                                    quantize_static, quantize_weight, unpack_int4)
from pallas_kernels.quant_matmul import pack_int4 as kernel_pack_int4


def _np_quantize(w, bits, granularity, group, symmetric):
    """float64 reference: (codes [B,K,N], dequantized, per-element scale)."""
    b, k, n = w.shape
    top = 2 ** (bits - 1) - 1
    if granularity == "tensor":
        view = w.reshape(b, 1, k * n)
    elif granularity == "channel":
        view = w.transpose(0, 2, 1)[:, :, None, :].reshape(b, n, 1, k)
    else:
        view = w.reshape(b, k // group, group, n).transpose(0, 1, 3, 2)  # [b, G, N, g]
    if symmetric:
        s = np.abs(view).max(-1, keepdims=True) / top
        s = np.where(s > 0, s, 1.0)
        q = np.clip(np.round(view / s), -top, top)
        deq = q * s
    else:
        lo, hi = np.minimum(view.min(-1, keepdims=True), 0), np.maximum(view.max(-1, keepdims=True), 0)
        s = np.where(hi > lo, (hi - lo) / (2 * top + 1), 1.0)
        z = -top - 1 - np.round(lo / s)
        q = np.clip(np.round(view / s) + z, -top - 1, top)
        deq = (q - z) * s
    s = np.broadcast_to(s, view.shape)

    def back(a):
        if granularity == "tensor":
            return a.reshape(b, k, n)
        if granularity == "channel":
            return a.reshape(b, n, k).transpose(0, 2, 1)
        return a.transpose(0, 1, 3, 2).reshape(b, k, n)
    return back(q), back(deq), back(s)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity,group", [("tensor", None), ("channel", None), ("group", 8)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_codes_and_round_trip_match_float64(bits, granularity, group, symmetric):
    rng = np.random.default_rng(bits + 3 * (group or 1) + symmetric)
    w = rng.standard_normal((2, 32, 6)) * np.array([0.02, 0.5, 3.0, 1.0, 0.1, 7.0])
    w[0, 5, 2] = 40.0  # an outlier
    qt = quantize_weight(jnp.asarray(w, jnp.float32), batch_dims=1, bits=bits,
                         granularity=granularity, group_size=group, symmetric=symmetric)
    q_ref, deq_ref, s_ref = _np_quantize(w.astype(np.float32).astype(np.float64), bits,
                                         granularity, group, symmetric)
    codes = np.asarray(int_values(qt))
    # float32 vs float64 division may flip a code sitting exactly on a .5 boundary; allow 1e-3.
    assert np.mean(codes != q_ref) < 1e-3
    deq = np.asarray(dequantize(qt), np.float64)
    np.testing.assert_allclose(deq[codes == q_ref], deq_ref[codes == q_ref], rtol=1e-5, atol=1e-6)
    # Round-to-nearest without clipping: |w - ŵ| <= s/2.
    assert np.all(np.abs(deq - w) <= s_ref / 2 * (1 + 1e-4) + 1e-6)
    assert qt.q.shape == ((2, 16, 6) if bits == 4 else (2, 32, 6))


def test_finer_granularity_lowers_error_and_int8_is_tight():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    w[3] *= 20  # an outlier input channel: row 3
    errs = {}
    for g, gs in (("tensor", None), ("channel", None), ("group", 8)):
        errs[g] = float(np.linalg.norm(np.asarray(dequantize(quantize_weight(
            jnp.asarray(w), bits=4, granularity=g, group_size=gs))) - w))
    assert errs["group"] < errs["channel"] < errs["tensor"]
    clean = rng.standard_normal((256, 16)).astype(np.float32)
    rel8 = np.linalg.norm(np.asarray(dequantize(quantize_weight(jnp.asarray(clean)))) - clean)
    assert rel8 / np.linalg.norm(clean) < 0.012  # ~ (max/127)/sqrt(12) / std for a Gaussian


def test_int4_packing_layout_is_the_kernels():
    rng = np.random.default_rng(1)
    q = rng.integers(-8, 8, (3, 10, 7)).astype(np.int8)
    ours = np.asarray(pack_int4(jnp.asarray(q)))
    np.testing.assert_array_equal(ours, np.asarray(kernel_pack_int4(jnp.asarray(q))))
    # Low nibble = even k, high nibble = odd k (two's complement).
    np.testing.assert_array_equal(ours.astype(np.uint8) & 0xF, q[:, 0::2].astype(np.uint8) & 0xF)
    np.testing.assert_array_equal(ours >> 4, q[:, 1::2])
    np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(ours))), q)
    with pytest.raises(ValueError, match="even"):
        pack_int4(jnp.zeros((3, 4), jnp.int8))


def test_activation_quantizers_match_float64():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 12)) * np.array([[0.1], [1.0], [30.0], [0.0], [2.0]])
    q, s = quantize_per_token(jnp.asarray(x, jnp.float32))
    amax = np.abs(x).max(-1)
    s_ref = np.where(amax > 0, amax / 127, 1.0)
    np.testing.assert_allclose(np.asarray(s), s_ref, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q), np.clip(np.round(x / s_ref[:, None]), -127, 127))
    assert np.all(np.abs(np.asarray(q) * np.asarray(s)[:, None] - x) <= s_ref[:, None] / 2 + 1e-6)
    # Static: one calibrated scale, values beyond it clip to ±127.
    qs = np.asarray(quantize_static(jnp.asarray(x, jnp.float32), jnp.float32(2.0 / 127)))
    assert qs.max() == 127 and qs.min() == -127
    np.testing.assert_array_equal(qs[0], np.round(x[0] / (2.0 / 127)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=4, granularity="group", group_size=16), "layer_x: group_size=16 does not divide the contraction dimension K=24"),
    (dict(bits=3), "layer_x: weight bits=3"),
    (dict(bits=8, granularity="group", group_size=3), None),  # 3 divides 24: fine for int8
    (dict(bits=4, granularity="group", group_size=3), "layer_x: int4 groups must be even"),
    (dict(bits=8, granularity="rows"), "layer_x: granularity='rows'"),
])
def test_unsupported_weight_settings_name_layer_and_setting(kwargs, match):
    w = jnp.ones((24, 4))
    if match is None:
        quantize_weight(w, name="layer_x", **kwargs)
        return
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        quantize_weight(w, name="layer_x", **kwargs)
