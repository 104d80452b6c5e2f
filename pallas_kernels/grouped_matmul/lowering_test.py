"""The compiled (non-interpret) kernels lower for their hardware from any host: Triton IR for
CUDA (pallas_gpu) and Mosaic for TPU (pallas_tpu), forward and backward, at an MoE shape with
the heuristic configs. Catches ops a lowering rejects; says nothing about speed."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.grouped_matmul import api

# (backend, lowering platform, what marks a kernel call in the lowered module)
TARGETS = [("pallas_gpu", "cuda", "__gpu$xla.gpu.triton"), ("pallas_tpu", "tpu", "tpu_custom_call")]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("name, platform, marker", TARGETS, ids=[t[0] for t in TARGETS])
def test_forward_and_backward_lower(monkeypatch, name, platform, marker, dtype):
    monkeypatch.setattr(jax, "default_backend", lambda: platform.replace("cuda", "gpu"))
    t, g, k, n = 4096, 16, 1024, 384  # n: not a multiple of the heuristic's 256-wide tiles

    def fwd_bwd(lhs, rhs, sizes, d_out):
        out, vjp = jax.vjp(lambda a, b: api.gmm(a, b, sizes, implementation=name), lhs, rhs)
        return out, vjp(d_out)

    args = (jax.ShapeDtypeStruct((t, k), dtype), jax.ShapeDtypeStruct((g, k, n), dtype),
            jax.ShapeDtypeStruct((g,), jnp.int32), jax.ShapeDtypeStruct((t, n), dtype))
    text = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) == 3  # gmm, gmm with rhs transposed, tgmm
