"""The "cudnn" backend: layout mapping and refusals everywhere; numerics on a GPU only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import api, cudnn, masks
from pallas_kernels.block_sparse_attention.reference import attention_reference

_ON_GPU = jax.default_backend() == "gpu"


def test_layout_arguments():
    assert cudnn.cudnn_arguments(masks.CausalLayout()) == dict(is_causal=True)
    assert cudnn.cudnn_arguments(masks.SlidingWindowLayout(9)) == dict(
        is_causal=True, local_window_size=(8, 0))
    assert cudnn.cudnn_arguments(masks.FullLayout()) == dict(is_causal=False)
    with pytest.raises(NotImplementedError, match="LozaLayout"):
        cudnn.cudnn_arguments(masks.LozaLayout())


@pytest.mark.parametrize("kwargs, message", [
    (dict(layout=masks.LozaLayout(4, 1, 2)), "LozaLayout"),
    (dict(q_segment_ids=np.zeros((1, 8), np.int32), kv_segment_ids=np.zeros((1, 8), np.int32)),
     "segment ids"),
    (dict(q_positions=np.arange(8)[None], kv_positions=np.arange(8)[None]), "explicit positions"),
    (dict(return_lse=True), "return_lse"),
])
def test_refuses_what_cudnn_cannot_express(kwargs, message):
    if not _ON_GPU:
        message = "platform"
    kwargs = dict(dict(layout=masks.CausalLayout(), scale=0.5), **kwargs)
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match=message):
        cudnn.block_sparse_attention(q, q, q, **kwargs)


@pytest.mark.skipif(not _ON_GPU, reason="cuDNN runs on a GPU only")
@pytest.mark.parametrize("layout", [masks.CausalLayout(), masks.SlidingWindowLayout(33)],
                         ids=["causal", "window"])
def test_matches_the_reference_on_gpu(layout):
    """MLA prefill head dims (Dk=192, Dv=128), bf16: forward and gradients."""
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((2, 256, 4, 192)), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((2, 256, 4, 128)), jnp.bfloat16)
    d_out = jnp.asarray(rng.standard_normal((2, 256, 4, 128)), jnp.float32)

    def grads(impl):
        def loss(q, k, v):
            out = api.block_sparse_attention(q, k, v, layout=layout, scale=0.1,
                                             implementation=impl)
            return jnp.sum(out.astype(jnp.float32) * d_out), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, out), got = grads("cudnn")
    want_out = attention_reference(q, k, v, layout=layout, scale=0.1)
    (_, _), want = grads("reference")
    for g, w in zip((out,) + got, (want_out,) + want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.max(np.abs(g - w)) <= 3e-2 * np.max(np.abs(w))
