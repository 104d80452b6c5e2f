"""The compiled (non-interpret) Pallas kernels lower for their hardware from any host: Triton IR
for CUDA (pallas_gpu) and Mosaic for TPU (pallas_tpu), every mode, at the issue's shapes with the
heuristic configs. Catches ops a lowering rejects; says nothing about speed. (The Triton kernel
is compiled down to a cubin in triton_test.py.)"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.quant_matmul import api

# (backend, lowering platform, what marks a kernel call in the lowered module)
TARGETS = [("pallas_gpu", "cuda", "__gpu$xla.gpu.triton"), ("pallas_tpu", "tpu", "tpu_custom_call")]
# (M, K, N, bits, int8 activations, group size, integer scales, experts)
SHAPES = {
    "w8a8_8192": (8192, 8192, 8192, 8, True, None, False, None),
    "w4a8_odyssey_decode": (16, 8192, 28672, 4, True, None, False, None),
    "w4a8_int_g128_m1": (1, 8192, 28672, 4, True, 128, True, None),
    "w4a8_float_g128_decode": (16, 8192, 28672, 4, True, 128, False, None),
    "w4a16_g128_decode": (16, 8192, 28672, 4, False, 128, False, None),
    "w4a16_m1": (1, 8192, 28672, 4, False, None, False, None),
    "w4a8_int_g128_split_k": (16, 8192, 8192, 4, True, 128, True, None),  # GPU: split_k=2
    "gmm_w4a8_int_g128": (4096, 1024, 384, 4, True, 128, True, 16),
    "gmm_w8a16": (4096, 1024, 384, 8, False, None, False, 16),
}
S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("name, platform, marker", TARGETS, ids=[t[0] for t in TARGETS])
def test_lowers(monkeypatch, name, platform, marker, shape):
    monkeypatch.setattr(jax, "default_backend", lambda: platform.replace("cuda", "gpu"))
    m, k, n, bits, a8, group, integer, experts = SHAPES[shape]
    lead = () if experts is None else (experts,)
    scales = lead + ((n,) if group is None else (k // group, n))
    static = dict(bits=bits, group_size=group, alpha=1024.0 if integer else None,
                  implementation=name)

    def call(x, w, w_scale, x_scale, sizes):
        if experts is None:
            return api.quant_matmul(x, w, w_scale=w_scale, x_scale=x_scale, **static)
        return api.quant_gmm(x, w, sizes, w_scale=w_scale, x_scale=x_scale, **static)

    args = (S((m, k), jnp.int8 if a8 else jnp.bfloat16), S(lead + (k * bits // 8, n), jnp.int8),
            S(scales, jnp.int32 if integer else jnp.float32),
            S((m,), jnp.float32) if a8 else None, S(lead, jnp.int32) if experts else None)
    text = jax.jit(call).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) == 1
