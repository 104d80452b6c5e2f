"""The "pallas_tpu" backend: the contract in TPU interpret mode on CPU, and Mosaic lowering."""

from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.block_sparse_attention import masks, pallas_tpu
from pallas_kernels.block_sparse_attention.contract import AttentionContract


class TestPallasTpuInterpret(AttentionContract):
    implementation = "pallas_tpu_interpret"
    visits_only_active_blocks = True
    # TPU interpret mode simulates every grid step: the other cases are marked slow (conftest).
    fast_cases = ("window_gqa", "loza_mqa_dk_ne_dv", "packed_segments_loza", "fully_masked_rows",
                  "bf16_loza_gqa")


_S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("shapes, layout, dtype, extras", [
    (((1, 1024, 4, 128), (1, 1024, 2, 128), (1, 1024, 2, 128)), masks.CausalLayout(),
     jnp.bfloat16, ()),
    (((1, 1024, 2, 192), (1, 1024, 2, 192), (1, 1024, 2, 128)), masks.LozaLayout(128, 1, 2),
     jnp.bfloat16, ("segments",)),
    (((2, 300, 4, 64), (2, 500, 1, 64), (2, 500, 1, 64)), masks.SlidingWindowLayout(100),
     jnp.float32, ("positions",)),
], ids=["causal_gqa", "loza_mla_segments", "window_f32_positions"])
def test_lowers_to_mosaic(shapes, layout, dtype, extras):
    """Pallas -> Mosaic lowering for TPU without a TPU (block shapes, index maps, ops); the
    Mosaic compiler proper runs only on a device."""
    (b, s, _, _), (_, t, _, _) = shapes[0], shapes[1]
    arrays = {}
    if "segments" in extras:
        arrays.update(q_segment_ids=_S((b, s), jnp.int32), kv_segment_ids=_S((b, t), jnp.int32))
    if "positions" in extras:
        arrays.update(q_positions=_S((b, s), jnp.int32), kv_positions=_S((b, t), jnp.int32))

    def forward_and_vjp(q, k, v, arrays):
        attend = lambda q, k, v: pallas_tpu.block_sparse_attention(
            q, k, v, layout=layout, scale=0.1, return_lse=True, **arrays)
        outputs, vjp = jax.vjp(attend, q, k, v)
        return outputs, vjp(outputs)

    with mock.patch.object(jax, "default_backend", lambda: "tpu"):
        text = jax.jit(forward_and_vjp).trace(*(_S(x, dtype) for x in shapes), arrays).lower(
            lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3  # forward, dQ, dK/dV


def test_hardware_path_refuses_small_blocks_and_other_platforms():
    q = jnp.zeros((1, 32, 2, 16), jnp.float32)
    if jax.default_backend() != "tpu":
        with pytest.raises(NotImplementedError, match="platform="):
            pallas_tpu.block_sparse_attention(q, q, q, layout=masks.CausalLayout(), scale=1.0)
    with mock.patch.object(jax, "default_backend", lambda: "tpu"), pytest.raises(
            NotImplementedError, match="block size 64"):
        pallas_tpu.block_sparse_attention(q, q, q, layout=masks.CausalLayout(), scale=1.0,
                                          config=pallas_tpu.Config(block_q=64))
    with pytest.raises(NotImplementedError, match="dtype=float16"):
        pallas_tpu.block_sparse_attention(q.astype(jnp.float16), q.astype(jnp.float16),
                                          q.astype(jnp.float16), layout=masks.CausalLayout(),
                                          scale=1.0, interpret=True)
