"""The "pallas_gpu" backend: the contract in interpret mode on CPU, and Triton lowering checks.

No GPU is needed to lower: `lower(lowering_platforms=("cuda",))` runs the Pallas -> Triton IR
step, which is where unsupported ops and tile shapes fail (PTX compilation is not exercised).
"""

from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.block_sparse_attention import masks, pallas_gpu
from pallas_kernels.block_sparse_attention.contract import AttentionContract


class TestPallasGpuInterpret(AttentionContract):
    implementation = "pallas_gpu_interpret"
    visits_only_active_blocks = True


def lower_for_cuda(q, k, v, layout, **arrays):
    """Lower forward + VJP of the hardware (non-interpret) path for CUDA; return the HLO text."""
    def forward_and_vjp(q, k, v, arrays):
        attend = lambda q, k, v: pallas_gpu.block_sparse_attention(
            q, k, v, layout=layout, scale=0.1, return_lse=True, **arrays)
        outputs, vjp = jax.vjp(attend, q, k, v)
        return outputs, vjp(outputs)

    with mock.patch.object(jax, "default_backend", lambda: "gpu"):
        lowered = jax.jit(forward_and_vjp).trace(q, k, v, arrays).lower(
            lowering_platforms=("cuda",))
    return lowered.as_text()


_S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("shapes, layout, dtype, extras", [
    (((1, 512, 4, 128), (1, 512, 2, 128), (1, 512, 2, 128)), masks.CausalLayout(), jnp.bfloat16,
     ()),
    (((1, 384, 2, 192), (1, 384, 2, 192), (1, 384, 2, 128)), masks.LozaLayout(64, 1, 2),
     jnp.bfloat16, ("segments",)),
    (((2, 200, 4, 64), (2, 300, 1, 64), (2, 300, 1, 64)), masks.SlidingWindowLayout(100),
     jnp.float32, ("positions",)),
    (((1, 256, 2, 64), (1, 256, 2, 64), (1, 256, 2, 64)),
     masks.BlockMaskLayout(((True, False), (True, True)), 128) & masks.SlidingWindowLayout(200),
     jnp.bfloat16, ()),
], ids=["causal_gqa", "loza_mla_segments", "window_f32_positions", "block_mask"])
def test_lowers_to_triton(shapes, layout, dtype, extras):
    (b, s, _, _), (_, t, _, _) = shapes[0], shapes[1]
    arrays = {}
    if "segments" in extras:
        arrays.update(q_segment_ids=_S((b, s), jnp.int32), kv_segment_ids=_S((b, t), jnp.int32))
    if "positions" in extras:
        arrays.update(q_positions=_S((b, s), jnp.int32), kv_positions=_S((b, t), jnp.int32))
    text = lower_for_cuda(*(_S(x, dtype) for x in shapes), layout, **arrays)
    assert text.count("xla.gpu.triton") == 3  # forward, dQ, dK/dV


def test_hardware_path_needs_a_gpu_and_big_enough_blocks():
    q = jnp.zeros((1, 32, 2, 16), jnp.float32)
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="platform='cpu'"):
            pallas_gpu.block_sparse_attention(q, q, q, layout=masks.CausalLayout(), scale=1.0)
    with mock.patch.object(jax, "default_backend", lambda: "gpu"), pytest.raises(
            NotImplementedError, match="block size 8"):
        pallas_gpu.block_sparse_attention(q, q, q, layout=masks.CausalLayout(), scale=1.0,
                                          config=pallas_gpu.Config(block_q=8))


def test_block_mask_under_or_is_refused_by_name():
    q = jnp.zeros((1, 32, 1, 16), jnp.float32)
    layout = masks.BlockMaskLayout(((True,),), 32) | masks.SlidingWindowLayout(4)
    with pytest.raises(NotImplementedError, match="inside an OrLayout"):
        pallas_gpu.block_sparse_attention(q, q, q, layout=layout, scale=1.0, interpret=True)


def test_default_config_fits_the_problem():
    config = pallas_gpu.default_config((1, 32768, 32, 128), (1, 32768, 8, 128),
                                       (1, 32768, 8, 128), masks.CausalLayout())
    assert (config.block_q, config.block_k) == (128, 64) and not config.interpret
    mla = pallas_gpu.default_config((1, 4096, 16, 192), (1, 4096, 16, 192), (1, 4096, 16, 128),
                                    masks.LozaLayout())
    assert (mla.block_q, mla.block_k) == (64, 32)
    tiny = pallas_gpu.default_config((1, 40, 2, 16), (1, 40, 1, 16), (1, 40, 1, 16),
                                     masks.BlockMaskLayout(((True,),), 8), interpret=True)
    assert tiny.block_q == tiny.block_k == 8
    with pytest.raises(ValueError, match="block_q=48"):
        pallas_gpu.Config(block_q=48)
