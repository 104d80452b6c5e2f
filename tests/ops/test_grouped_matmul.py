"""lcjax.ops.grouped_matmul: forwards to pallas_kernels' gmm, default backend per platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.ops import grouped_matmul as ops_gmm
from pallas_kernels.grouped_matmul import api, pallas_gpu, reference


def _inputs(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((40, 12)), dtype)
    w = jnp.asarray(rng.standard_normal((3, 12, 5)), jnp.float32)  # param dtype, cast by the op
    sizes = jnp.array([7, 0, 25], jnp.int32)  # 8 rows past the groups (zero-expert slots)
    return x, w, sizes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU default")
def test_default_on_cpu_is_segments_and_matches_numpy(monkeypatch):
    ran = []
    real = api.backend_module("segments").gmm
    monkeypatch.setattr(api.backend_module("segments"), "gmm",
                        lambda *a, **k: (ran.append(k["transpose_rhs"]), real(*a, **k))[1])
    x, w, sizes = _inputs()
    out = ops_gmm.grouped_matmul(x, w, sizes)
    np.testing.assert_allclose(np.asarray(out), reference.gmm_numpy(x, w, sizes), rtol=1e-5,
                               atol=1e-5)
    assert np.all(np.asarray(out)[32:] == 0)
    assert ran == [False]


def test_gradients_match_ragged_dot_through_a_named_kernel_backend():
    """The MoE's training path: d/dx and d/dw through the pallas_gpu kernels (interpreted)."""
    x, w, sizes = _inputs()

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))

    config = pallas_gpu.Config(block_m=16, block_n=16, block_k=16, interpret=True)

    def kernel(x, w):  # what the op calls, with an interpret config it does not expose
        return api.gmm(x, w, sizes, implementation="pallas_gpu", config=config)

    got = jax.grad(loss(kernel), argnums=(0, 1))(x, w)
    want = jax.grad(loss(lambda x, w: jax.lax.ragged_dot(
        x, w, sizes, precision=jax.lax.Precision.HIGHEST)), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_forwards_implementation_and_casts_weights(monkeypatch):
    seen = []
    real = api.gmm

    def spy(x, w, group_sizes, **kwargs):
        seen.append((w.dtype, kwargs))
        return real(x, w, group_sizes, **kwargs)

    monkeypatch.setattr(ops_gmm, "gmm", spy)
    x, w, sizes = _inputs(jnp.bfloat16)
    out = ops_gmm.grouped_matmul(x, w, sizes, implementation="xla")
    assert out.dtype == jnp.bfloat16
    assert seen == [(jnp.bfloat16, {"implementation": "xla"})]


def test_bad_implementation_is_rejected():
    x, w, sizes = _inputs()
    with pytest.raises(ValueError, match="implementation='fast'"):
        ops_gmm.grouped_matmul(x, w, sizes, implementation="fast")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the kernels run on accelerators")
def test_a_named_kernel_backend_does_not_fall_back_on_cpu():
    x, w, sizes = _inputs()
    with pytest.raises(NotImplementedError, match="pallas_tpu: platform='cpu'"):
        ops_gmm.grouped_matmul(x, w, sizes, implementation="pallas_tpu")
