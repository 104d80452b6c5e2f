"""weight_einsum: the written-out einsum gradients equal autodiff of jnp.einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.model.layers import weight_einsum

CASES = [  # spec, x shape, w shape
    ("BSM,MV->BSV", (2, 3, 5), (5, 7)),
    ("BSHD,HDM->BSM", (2, 3, 4, 2), (4, 2, 6)),  # two contracted dims
    ("BTC,CHD->BTHD", (2, 3, 5), (5, 2, 3)),  # split output dims
    ("EM,MF->EMF", (3, 4), (4, 2)),  # an index kept from both operands (no contraction)
    ("BSM,M->BS", (2, 3, 4), (4,)),
]


@pytest.mark.parametrize("spec,xs,ws", CASES)
def test_forward_and_gradients_match_autodiff(spec, xs, ws):
    kx, kw, kc = jax.random.split(jax.random.key(len(spec)), 3)
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    ref = jnp.einsum(spec, x, w, precision="highest")
    cot = jax.random.normal(kc, ref.shape)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * cot)

    got = weight_einsum(spec, x, w)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    g_got = jax.grad(loss(lambda x, w: weight_einsum(spec, x, w)), argnums=(0, 1))(x, w)
    # float64 numpy reference of the cotangents: dx = cot . w, dw = x . cot over the spec.
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    x64, w64, c64 = (np.asarray(a, np.float64) for a in (x, w, cot))
    dx = np.einsum(f"{out},{rhs}->{lhs}", c64, w64)
    dw = np.einsum(f"{lhs},{out}->{rhs}", x64, c64)
    np.testing.assert_allclose(g_got[0], dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_got[1], dw, rtol=1e-4, atol=1e-4)


def test_index_in_one_operand_alone_falls_back_to_autodiff():
    # "M" is summed away inside x alone: the written-out transpose does not apply.
    x, w = jax.random.normal(jax.random.key(0), (2, 3)), jax.random.normal(jax.random.key(1), (4,))
    grad = jax.grad(lambda x, w: jnp.sum(weight_einsum("NM,V->NV", x, w) ** 2), (0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(jnp.einsum("NM,V->NV", x, w) ** 2), (0, 1))(x, w)
    np.testing.assert_allclose(grad[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(grad[1], ref[1], rtol=1e-5)


def test_mixed_dtypes_keep_each_cotangent_dtype():
    x = jax.random.normal(jax.random.key(0), (3, 4), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (4, 5), jnp.float32)
    gx, gw = jax.grad(lambda x, w: jnp.sum(weight_einsum("NM,MV->NV", x, w)), (0, 1))(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(gw, np.float32),
                               np.asarray(x, np.float32).sum(0)[:, None] * np.ones((1, 5)),
                               rtol=1e-2)
