"""The "splash" backend: mask translation, refusals, and "splash_interpret" against the reference
(forward and gradients, causal and LoZA, packed documents) on any platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import api, masks

splash = pytest.importorskip("pallas_kernels.block_sparse_attention.splash")

from pallas_kernels.block_sparse_attention.reference import attention_reference  # noqa: E402


@pytest.mark.parametrize("layout", [masks.CausalLayout(), masks.FullLayout(),
                                    masks.SlidingWindowLayout(5), masks.LozaLayout(4, 1, 2),
                                    masks.LozaLayout(4, 1, 2) | masks.SlidingWindowLayout(3)],
                         ids=["causal", "full", "window", "loza", "composed"])
def test_mask_is_the_layout(layout):
    got = np.asarray(splash.splash_mask(layout, 40, 40)[:, :])
    np.testing.assert_array_equal(got, layout.to_dense(40, 40))


def test_refusals():
    q = jnp.zeros((1, 128, 2, 8))
    pos = jnp.zeros((1, 128), jnp.int32)
    if jax.default_backend() != "tpu":
        with pytest.raises(NotImplementedError, match="platform"):
            splash.block_sparse_attention(q, q, q, layout=masks.CausalLayout(), scale=1.0)
    for kwargs, message in ((dict(q_positions=pos, kv_positions=pos), "explicit positions"),
                            (dict(return_lse=True), "return_lse")):
        with pytest.raises(NotImplementedError, match=message):
            splash.block_sparse_attention(q, q, q, layout=masks.CausalLayout(), scale=1.0,
                                          interpret=True, **kwargs)
    with pytest.raises(NotImplementedError, match="multiples of a block"):
        splash.block_sparse_attention(q[:, :40], q[:, :40], q[:, :40],
                                      layout=masks.CausalLayout(), scale=1.0, interpret=True)


@pytest.mark.parametrize("layout", [masks.CausalLayout(), masks.LozaLayout(8, 1, 2)],
                         ids=["causal", "loza"])
def test_interpret_matches_the_reference(layout):
    rng = np.random.default_rng(0)
    batch, s_len = 2, 128
    q = jnp.asarray(rng.standard_normal((batch, s_len, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, s_len, 2, 16)), jnp.float32)
            for _ in range(2))
    seg = jnp.asarray(np.stack([np.repeat([1, 2], [50, 78]), np.repeat([1, 2, 3], [9, 80, 39])]),
                      jnp.int32)
    d_out = jnp.asarray(rng.standard_normal((batch, s_len, 4, 16)), jnp.float32)

    def run(impl):
        def loss(q, k, v):
            out = api.block_sparse_attention(q, k, v, layout=layout, scale=0.3,
                                             q_segment_ids=seg, kv_segment_ids=seg,
                                             implementation=impl)
            return jnp.sum(out * d_out), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, out), grads = run("splash_interpret")
    (_, want), want_grads = run("reference")
    for g, w in zip((out,) + grads, (want,) + want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=5e-5, atol=5e-5)
