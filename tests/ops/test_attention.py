"""lcjax.ops.attention: layout choice from the config and forwarding to pallas_kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config import LozaConfig
from lcjax.ops import attention as ops_attention
from pallas_kernels.block_sparse_attention import api, masks


def test_layout_for_dense_and_sparse_layers():
    assert ops_attention.layout_for(False, LozaConfig()) == masks.CausalLayout()
    assert ops_attention.layout_for(True, LozaConfig()) == masks.LozaLayout(128, 1, 7)
    custom = LozaConfig(block_size=64, sink_blocks=2, local_blocks=3)
    assert ops_attention.layout_for(True, custom) == masks.LozaLayout(64, 2, 3)


def test_layout_for_matches_the_spec_mask():
    layout = ops_attention.layout_for(True, LozaConfig())
    q, k = np.arange(1100)[:, None], np.arange(1100)[None, :]
    spec = (k <= q) & ((k // 128 < 1) | (k // 128 >= q // 128 - 6))  # spec §4
    np.testing.assert_array_equal(layout.to_dense(1100, 1100), spec)


def test_reexported_layouts_are_the_kernel_library_classes():
    assert ops_attention.LozaLayout is masks.LozaLayout
    assert ops_attention.CausalLayout is masks.CausalLayout


def test_forwards_arguments_and_selects_the_named_backend(monkeypatch):
    seen = []
    real = api.REGISTRY.implementations["xla"]

    def spy(q, k, v, **kwargs):
        seen.append(kwargs)
        return real(q, k, v, **kwargs)

    monkeypatch.setitem(api.REGISTRY.implementations, "xla", spy)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 2, 4, 12)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 9, 1, 12)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 9, 1, 6)), jnp.float32)
    kv_pos = jnp.asarray([[0, 1, 2, 3, 4, 5, -1, -1, -1]], jnp.int32)  # 3 empty cache slots
    q_pos = jnp.asarray([[4, 5]], jnp.int32)
    layout = masks.LozaLayout(2, 1, 1)
    kwargs = dict(layout=layout, q_positions=q_pos, kv_positions=kv_pos, scale=0.5)

    @jax.jit
    def both(q, k, v):
        return (ops_attention.attention(q, k, v, return_lse=True, **kwargs),
                api.attention_reference(q, k, v, return_lse=True, **kwargs))

    (out, lse), (want_out, want_lse) = both(q, k, v)
    # The default on CPU is "xla" (block pairs at the default precision), not the reference.
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=2e-6, atol=2e-6)
    assert len(seen) == 1 and seen[0]["layout"] == layout and seen[0]["scale"] == 0.5
    # Query at position 4 (block 2) sees the sink block {0, 1} and its own block {4}.
    s = np.asarray(q[0, 0, 0] @ k[0, :, 0].T) * 0.5
    p = np.exp(s[[0, 1, 4]] - s[[0, 1, 4]].max())
    want = (p / p.sum()) @ np.asarray(v[0, [0, 1, 4], 0])
    np.testing.assert_allclose(np.asarray(out[0, 0, 0]), want, rtol=1e-5, atol=1e-6)


def test_unknown_implementation_is_rejected():
    q = jnp.zeros((1, 2, 2, 4), jnp.float32)
    with pytest.raises(ValueError, match="implementation='fast'"):
        jax.eval_shape(lambda q: ops_attention.attention(
            q, q, q, layout=masks.CausalLayout(), implementation="fast"), q)


def test_sequence_positions_keep_the_per_document_mask():
    """Aranges for layouts that see only position differences, per-document positions for LoZA;
    either way the mask equals the mask on per-document positions (contiguous documents)."""
    seg = jnp.asarray([[1] * 7 + [2] * 20 + [0] * 3, [1] * 30], jnp.int32)
    doc = ops_attention.document_positions(seg)
    np.testing.assert_array_equal(np.asarray(doc[0]), np.r_[np.arange(7), np.arange(20),
                                                              np.arange(3)])
    same_seg = np.asarray(seg[:, :, None] == seg[:, None, :])
    for layout in (masks.CausalLayout(), masks.SlidingWindowLayout(5), masks.LozaLayout(4, 1, 2)):
        pos = ops_attention.sequence_positions(layout, seg)
        assert (pos is None) == (not isinstance(layout, masks.LozaLayout))
        if pos is None:
            pos = jnp.broadcast_to(jnp.arange(30, dtype=jnp.int32), (2, 30))
        got = np.asarray(layout.allowed(pos[:, :, None], pos[:, None, :])) & same_seg
        want = np.asarray(layout.allowed(doc[:, :, None], doc[:, None, :])) & same_seg
        np.testing.assert_array_equal(got, want)
    assert ops_attention.sequence_positions(masks.LozaLayout(4, 1, 2), None) is None
