"""int4 packing and the int32 accumulator bound of reference.py (the modes' math is checked per
backend by the contract, the reference included: xla_test.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant_matmul import reference


def test_pack_layout_and_round_trip():
    w = np.array(np.meshgrid(np.arange(-8, 8), np.arange(-8, 8))).reshape(2, -1)  # all pairs
    w = np.stack([w[0], w[1]], axis=0).reshape(2, 256)  # K=2: row 0 even k, row 1 odd k
    packed = np.asarray(reference.pack_int4(jnp.asarray(w, jnp.int8)))
    assert packed.dtype == np.int8 and packed.shape == (1, 256)
    want = ((w[0] & 0xF) | ((w[1] & 0xF) << 4)).astype(np.uint8).view(np.int8)
    np.testing.assert_array_equal(packed[0], want)
    np.testing.assert_array_equal(np.asarray(reference.unpack_int4(jnp.asarray(packed))), w)


def test_round_trip_with_expert_axis_and_sint4tos8_identities():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.integers(-8, 8, size=(3, 10, 7)), jnp.int8)
    packed = reference.pack_int4(w)
    assert packed.shape == (3, 5, 7)
    np.testing.assert_array_equal(reference.unpack_int4(packed), w)
    # OdysseyLLM: p << 4 == 16·lo and p & 0xF0 == 16·hi, as int8
    np.testing.assert_array_equal(jnp.left_shift(packed, 4), 16 * w[:, 0::2].astype(jnp.int32))
    np.testing.assert_array_equal(packed & jnp.int8(-16), 16 * w[:, 1::2].astype(jnp.int32))


def test_pack_refuses_odd_k():
    with pytest.raises(ValueError, match=r"K \(axis -2\) of shape \(3, 4\) must be even"):
        reference.pack_int4(jnp.zeros((3, 4), jnp.int8))


def _worst_case(k, bits):
    x = jnp.full((1, k), -128, jnp.int8)
    w = jnp.full((k, 1), -128 if bits == 8 else -8, jnp.int8)
    return x, (w if bits == 8 else reference.pack_int4(w))


def test_w8a8_accumulator_is_exact_up_to_the_bound_then_wraps():
    k = (2**31 - 1) // 2**14  # the largest K with K·128·128 < 2^31
    assert reference.accumulator_bound(k, 8) < 2**31 <= reference.accumulator_bound(k + 1, 8)
    x, w = _worst_case(k, 8)
    assert int(reference.integer_accumulator(x, w, bits=8)[0, 0]) == k * 2**14
    x, w = _worst_case(k + 1, 8)  # 2^31: int32 wraps, as it does in every kernel
    assert int(reference.integer_accumulator(x, w, bits=8)[0, 0]) == -(2**31)


def test_integer_scale_bound_picks_the_amplifier():
    """techniques.md §2: choose alpha so (K/g)·g·128·8·max s_int < 2^31. At K=4096, g=128 the
    largest safe s_int is 511; the worst case is exact there."""
    k, g = 4096, 128
    max_s = (2**31 - 1) // reference.accumulator_bound(k, 4)
    assert max_s == 511 and reference.accumulator_bound(k, 4, max_s) < 2**31
    x, w = _worst_case(k, 4)
    s = jnp.full((k // g, 1), max_s, jnp.int32)
    acc = reference.integer_accumulator(x, w, bits=4, group_size=g, integer_scale=s)
    assert int(acc[0, 0]) == k * 128 * 8 * max_s
