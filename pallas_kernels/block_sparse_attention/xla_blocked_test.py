"""The "xla" backend (block-skipping plain XLA): the shared contract, packed documents with explicit
positions against the dense reference, the run-time plan guard, and its cost."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import api, masks, xla_blocked
from pallas_kernels.block_sparse_attention.contract import AttentionContract
from pallas_kernels.block_sparse_attention.reference import attention_reference

_HIGHEST = jax.lax.Precision.HIGHEST


class TestXla(AttentionContract):
    implementation = "xla"
    visits_only_active_blocks = True


def _documents(rng, batch, s_len, with_padding):
    """Contiguous documents of random lengths per row (ids 1, 2, ...), an optional padding run
    (id 0) at the end, and their per-document positions."""
    seg = np.zeros((batch, s_len), np.int32)
    for b in range(batch):
        end = s_len - (rng.integers(1, 6) if with_padding else 0)
        cuts = np.sort(rng.choice(np.arange(1, end), size=3, replace=False))
        seg[b, :end] = np.searchsorted(cuts, np.arange(end), side="right") + 1
    seg = jnp.asarray(seg)
    return seg, xla_blocked.document_positions(seg)


def _inputs(rng, batch, s_len, heads, groups, d_k, d_v, dtype):
    shapes = ((batch, s_len, heads, d_k), (batch, s_len, groups, d_k), (batch, s_len, groups, d_v))
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)


def _loss_and_grads(fn, q, k, v, d_out):
    """Forward output and the gradients of <out, d_out> (one jit)."""
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * d_out), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)


def _close(got, want, rtol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err, size = np.max(np.abs(got - want)), np.max(np.abs(want))
    assert err <= rtol * max(size, 1e-6), f"{what}: max error {err:.3g} vs max |want| {size:.3g}"


@pytest.mark.parametrize("layout, block, dtype, rtol", [
    (masks.CausalLayout(), 8, jnp.float32, 2e-5),
    (masks.LozaLayout(4, 1, 2), 4, jnp.float32, 2e-5),
    (masks.LozaLayout(4, 2, 3), 8, jnp.float32, 2e-5),  # kernel block spans two LoZA blocks
    (masks.LozaLayout(8, 1, 2), 4, jnp.bfloat16, 3e-2),  # LoZA block spans two kernel blocks
    (masks.SlidingWindowLayout(5), 16, jnp.float32, 2e-5),
], ids=["causal", "loza", "loza_wide_block", "loza_bf16", "window"])
def test_packed_documents_match_the_reference(layout, block, dtype, rtol):
    """Explicit per-document positions (the model's packed training batches): out and grads."""
    rng = np.random.default_rng(block)
    batch, s_len = 3, 53
    q, k, v = _inputs(rng, batch, s_len, 4, 2, 16, 8, dtype)
    seg, pos = _documents(rng, batch, s_len, with_padding=True)
    d_out = jnp.asarray(rng.standard_normal((batch, s_len, 4, 8)), jnp.float32)
    kwargs = dict(layout=layout, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                  kv_segment_ids=seg, scale=0.3)
    config = xla_blocked.Config(block)
    (_, got), got_grads = _loss_and_grads(
        lambda q, k, v: xla_blocked.block_sparse_attention(q, k, v, config=config, **kwargs),
        q, k, v, d_out)
    (_, want), want_grads = _loss_and_grads(
        lambda q, k, v: attention_reference(q, k, v, **kwargs), q, k, v, d_out)
    assert got.dtype == dtype
    _close(got, want, rtol, "out")
    for name, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
        assert g.dtype == dtype
        _close(g, w, rtol, name)


def test_lse_of_packed_documents_matches_the_reference():
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, 2, 40, 2, 1, 8, 8, jnp.float32)
    seg, pos = _documents(rng, 2, 40, with_padding=False)
    kwargs = dict(layout=masks.LozaLayout(4, 1, 2), q_positions=pos, kv_positions=pos,
                  q_segment_ids=seg, kv_segment_ids=seg, scale=0.5, return_lse=True)
    got = jax.jit(functools.partial(xla_blocked.block_sparse_attention,
                                    config=xla_blocked.Config(4), **kwargs))(q, k, v)
    want = jax.jit(functools.partial(attention_reference, **kwargs))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("broken", ["positions", "non_contiguous_segments"])
def test_rows_the_plan_cannot_cover_are_nan(broken):
    """Positions that are neither global nor per-document aranges poison only their own row."""
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, 2, 24, 2, 2, 8, 8, jnp.float32)
    seg = jnp.asarray(np.repeat([[1, 2, 3]], 2, 0).repeat(8, 1), jnp.int32)
    if broken == "non_contiguous_segments":
        seg = seg.at[0].set(jnp.asarray(np.repeat([1, 2, 1], 8), jnp.int32))
    pos = xla_blocked.document_positions(seg)
    if broken == "positions":
        pos = pos.at[0, 5].set(9)
    out = jax.jit(functools.partial(
        xla_blocked.block_sparse_attention, layout=masks.CausalLayout(), q_positions=pos,
        kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg, scale=0.3))(q, k, v)
    assert np.all(np.isnan(np.asarray(out[0])))
    want = attention_reference(q[1:], k[1:], v[1:], layout=masks.CausalLayout(),
                               q_positions=pos[1:], kv_positions=pos[1:], q_segment_ids=seg[1:],
                               kv_segment_ids=seg[1:], scale=0.3)
    np.testing.assert_allclose(np.asarray(out[1:]), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_explicit_positions_refusals_name_the_case():
    q = jnp.zeros((1, 4, 2, 8))
    pos = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(NotImplementedError, match="BlockMaskLayout.*explicit positions"):
        xla_blocked.block_sparse_attention(q, q, q, layout=masks.BlockMaskLayout([[True]], 4),
                                           q_positions=pos, kv_positions=pos, scale=1.0)
    with pytest.raises(NotImplementedError, match="both q and kv positions"):
        xla_blocked.block_sparse_attention(q, q, q, layout=masks.CausalLayout(),
                                           q_positions=pos, scale=1.0)


def test_config_rejects_a_bad_block():
    with pytest.raises(ValueError, match="Config.block=0"):
        xla_blocked.Config(0)


def test_default_on_cpu_is_this_backend_and_refusals_fall_through(monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("default order differs off CPU")
    calls = []
    for name in ("xla", "reference"):
        real = api.REGISTRY.implementations[name]

        def spy(*args, _name=name, _real=real, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setitem(api.REGISTRY.implementations, name, spy)
    q = jax.ShapeDtypeStruct((1, 8, 2, 8), jnp.float32)
    jax.eval_shape(lambda q: api.block_sparse_attention(q, q, q, layout=masks.CausalLayout()), q)
    assert calls == ["xla"]
    calls.clear()
    pos = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    jax.eval_shape(lambda q, p: api.block_sparse_attention(
        q, q, q, layout=masks.BlockMaskLayout([[True]], 8), q_positions=p, kv_positions=p),
        q, pos)
    assert calls == ["xla", "reference"]


def _flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_dense_causal_costs_about_half_the_square():
    """XLA's own FLOP count, forward and backward, at S = T = 1024: the causal staircase, not
    the square (the reference computes the full square)."""
    spec = jax.ShapeDtypeStruct((1, 1024, 4, 64), jnp.float32)
    d_out = jax.ShapeDtypeStruct((1, 1024, 4, 64), jnp.float32)

    def fwd_bwd(impl):
        def run(q, k, v, d_out):
            out, vjp = jax.vjp(lambda q, k, v: api.block_sparse_attention(
                q, k, v, layout=masks.CausalLayout(), implementation=impl), q, k, v)
            return out, vjp(d_out)
        return run

    ratio = _flops(fwd_bwd("xla"), spec, spec, spec, d_out) / _flops(
        fwd_bwd("reference"), spec, spec, spec, d_out)
    pairs = xla_blocked.pair_count(masks.CausalLayout(), 1024, 1024) / 16**2
    assert pairs == pytest.approx(136 / 256)  # 16 blocks of 64: the staircase
    assert ratio <= 0.6, ratio


def test_decode_over_cache_slots_visits_every_pair():
    """S != T with explicit positions (ring-buffer slots, empty ones): the dense masked visit."""
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((2, 3, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 37, 1, 8)), jnp.float32) for _ in range(2))
    kv_pos = jnp.asarray(np.where(rng.random((2, 37)) < 0.2, -1,
                                  np.stack([rng.permutation(37) for _ in range(2)])), jnp.int32)
    q_pos = jnp.asarray([[34, 35, 36]] * 2, jnp.int32)
    kwargs = dict(layout=masks.LozaLayout(4, 1, 2), q_positions=q_pos, kv_positions=kv_pos,
                  scale=0.4)
    got = xla_blocked.block_sparse_attention(q, k, v, config=xla_blocked.Config(8), **kwargs)
    want = attention_reference(q, k, v, **kwargs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert xla_blocked.pair_count(kwargs["layout"], 3, 37, explicit_positions=True,
                                  config=xla_blocked.Config(8)) == 5


def test_loza_pairs_are_its_sink_and_local_blocks():
    layout = masks.LozaLayout(128, 1, 7)
    # 32 query blocks of 128: rows 0..7 are causal (sum 1..8), the other 24 visit 1 + 7 blocks.
    assert xla_blocked.pair_count(layout, 4096, 4096) == 36 + 24 * 8
    # Packed documents: the local window plus one sink chunk per query block.
    assert xla_blocked.pair_count(layout, 4096, 4096, explicit_positions=True) == (
        sum(min(i, 7) + 1 for i in range(32)) + 32)
