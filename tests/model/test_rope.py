"""RoPE: interleaved pairs vs a complex-number NumPy reference; YaRN frequency and scale rules."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.config import MLAConfig, RopeConfig, yarn_mscale
from lcjax.model.rope import apply_rope, inv_frequencies

from . import numpy_reference as ref


def test_default_rope_matches_complex_rotation():
    x = jax.random.normal(jax.random.key(0), (2, 7, 3, 8))
    pos = jnp.asarray(np.array([[0, 1, 2, 3, 4, 5, 6], [9, 3, 100, 7, 0, 2000, 5]]))
    rope = RopeConfig(theta=10000.0)
    got = apply_rope(x, pos, rope)
    for b in range(2):
        want = ref.rope_interleaved(np.asarray(x[b], np.float64), np.asarray(pos[b]), 10000.0)
        np.testing.assert_allclose(got[b], want, atol=2e-5)


def test_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))
    rope = RopeConfig(theta=1e7)

    def score(pq, pk):
        rq = apply_rope(q, jnp.asarray([[pq]]), rope)
        rk = apply_rope(k, jnp.asarray([[pk]]), rope)
        return float(jnp.sum(rq * rk))

    assert math.isclose(score(10, 3), score(1007, 1000), rel_tol=1e-4)


def test_yarn_interpolates_low_frequencies_only():
    base = RopeConfig(theta=10000.0)
    yarn = dataclasses.replace(base, type="yarn", factor=4.0, original_max_position_embeddings=64)
    f0, a0 = inv_frequencies(base, 64)
    f1, a1 = inv_frequencies(yarn, 64)
    assert a0 == 1.0 and math.isclose(a1, yarn_mscale(4.0))
    np.testing.assert_allclose(f1[0], f0[0])  # fast rotations extrapolate unchanged
    np.testing.assert_allclose(f1[-1], f0[-1] / 4.0)  # slow ones interpolate by the factor
    assert np.all(f1 <= f0 + 1e-15)
    same, _ = inv_frequencies(dataclasses.replace(base, type="yarn", factor=1.0), 64)
    np.testing.assert_allclose(same, f0)


def test_yarn_mscale_enters_softmax_scale():
    rope = RopeConfig(type="yarn", factor=8.0, mscale=1.0, mscale_all_dim=1.0)
    mla = MLAConfig(rope=rope)
    assert math.isclose(mla.softmax_scale, 192 ** -0.5 * (0.1 * math.log(8.0) + 1) ** 2)
    assert inv_frequencies(rope, 64)[1] == 1.0  # mscale / mscale_all_dim cancel in cos/sin
    assert MLAConfig().softmax_scale == 192 ** -0.5
