"""The "reference" backend (the dense jnp definition) against the float64 spec oracle."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import attention_reference, dense_mask, masks
from pallas_kernels.block_sparse_attention.contract import AttentionContract, spec_allowed


class TestReference(AttentionContract):
    implementation = "reference"


def test_dense_mask_combines_layout_slots_and_segments():
    layout = masks.LozaLayout(4, 1, 2)
    rng = np.random.default_rng(0)
    q_pos = rng.integers(0, 40, (2, 7))
    kv_pos = rng.integers(-1, 40, (2, 11))
    q_seg, kv_seg = rng.integers(0, 2, (2, 7)), rng.integers(0, 2, (2, 11))
    got = jax.jit(lambda *a: dense_mask(layout, *a))(
        *(jnp.asarray(x, jnp.int32) for x in (q_pos, kv_pos, q_seg, kv_seg)))
    want = (spec_allowed(layout, q_pos[:, :, None], kv_pos[:, None, :])
            & (q_seg[:, :, None] == kv_seg[:, None, :]))
    np.testing.assert_array_equal(np.asarray(got), want)


def test_default_positions_are_arange():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 10, 2, 4)), jnp.float32) for _ in range(3))
    pos = jnp.arange(10, dtype=jnp.int32)[None]
    layout = masks.SlidingWindowLayout(3)
    default, explicit = jax.jit(lambda q, k, v: (
        attention_reference(q, k, v, layout=layout),
        attention_reference(q, k, v, layout=layout, q_positions=pos, kv_positions=pos)))(q, k, v)
    np.testing.assert_array_equal(np.asarray(default), np.asarray(explicit))


def test_annotations_hold_under_runtime_type_checking():
    import beartype
    import jaxtyping

    checked = jaxtyping.jaxtyped(typechecker=beartype.beartype)(attention_reference)
    spec = jax.ShapeDtypeStruct
    q, k, v = spec((2, 3, 4, 6), jnp.float32), spec((2, 5, 2, 6), jnp.float32), spec(
        (2, 5, 2, 7), jnp.float32)
    pos = spec((2, 3), jnp.int32)
    out, lse = jax.eval_shape(
        lambda q, k, v, pos: checked(q, k, v, layout=masks.FullLayout(), q_positions=pos,
                                     return_lse=True), q, k, v, pos)
    assert out.shape == (2, 3, 4, 7) and lse.shape == (2, 4, 3)
    try:
        jax.eval_shape(lambda q, v: checked(q, q, v, layout=masks.FullLayout()), q, v)
    except jaxtyping.TypeCheckError:
        pass
    else:
        raise AssertionError("mismatched Dk was not caught by the annotations")


def test_softmax_statistics_are_float32_for_bf16_inputs():
    # Many equal keys: bf16 accumulation of the denominator would be visibly off.
    t_len = 4096
    q = jnp.ones((1, 1, 1, 8), jnp.bfloat16)
    k = jnp.zeros((1, t_len, 1, 8), jnp.bfloat16)
    v = jnp.ones((1, t_len, 1, 8), jnp.bfloat16)
    out, lse = jax.jit(lambda q, k, v: attention_reference(
        q, k, v, layout=masks.FullLayout(), return_lse=True))(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), 1.0)
    np.testing.assert_allclose(float(lse[0, 0, 0]), np.log(t_len), rtol=1e-6)
