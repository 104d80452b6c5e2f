"""Paged decode: reference vs the float64 oracle, kernels vs the reference, visit plans, lowering."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import decode, decode_kernel, masks
from pallas_kernels.block_sparse_attention.contract import oracle, spec_allowed

# name, layout, batch, S, H, G, Dk, Dv (None: values from keys), page, lengths, dtype
CASES = [
    ("gqa_causal", masks.CausalLayout(), 2, 1, 4, 2, 16, 16, 8, (13, 40), jnp.float32),
    ("loza_two_tokens", masks.LozaLayout(8, 1, 2), 3, 2, 4, 1, 16, 8, 8, (70, 9, 33),
     jnp.float32),
    ("mla_absorbed_loza", masks.LozaLayout(16, 1, 2), 2, 1, 8, 1, 576, None, 16, (100, 21),
     jnp.float32),
    ("window_bf16", masks.SlidingWindowLayout(11), 2, 3, 4, 4, 32, 32, 8, (50, 5), jnp.bfloat16),
]
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def make(case, seed=0):
    name, layout, batch, s_len, heads, groups, d_k, d_v, page, lengths, dtype = case
    rng = np.random.default_rng(seed)
    max_pages = max(-(-n // page) for n in lengths) + 1
    num_pages = batch * max_pages + 3
    tables = np.stack([rng.permutation(num_pages)[:max_pages] for _ in range(batch)])
    q = jnp.asarray(rng.standard_normal((batch, s_len, heads, d_k)), dtype)
    k_pages = jnp.asarray(rng.standard_normal((num_pages, page, groups, d_k)), dtype)
    v_pages = None if d_v is None else jnp.asarray(
        rng.standard_normal((num_pages, page, groups, d_v)), dtype)
    return (q, k_pages, v_pages, jnp.asarray(tables, jnp.int32),
            jnp.asarray(lengths, jnp.int32)), dict(layout=layout, scale=None,
                                                   v_head_dim=512 if d_v is None else None)


def _oracle(case, args):
    q, k_pages, v_pages, tables, lengths = (None if x is None else np.asarray(x, np.float64)
                                            for x in args)
    layout, s_len, d_v = case[1], case[3], case[7]
    batch = q.shape[0]
    k = k_pages[tables.astype(int)].reshape(batch, -1, *k_pages.shape[2:])
    v = k[..., :512] if d_v is None else v_pages[tables.astype(int)].reshape(batch, -1,
                                                                              *v_pages.shape[2:])
    slots = np.arange(k.shape[1])[None]
    kv_pos = np.where(slots < lengths[:, None], slots, -1)
    q_pos = lengths[:, None] - s_len + np.arange(s_len)[None]
    mask = spec_allowed(layout, q_pos[:, :, None], kv_pos[:, None, :])
    zeros_o = np.zeros(q.shape[:3] + (v.shape[3],))
    return oracle(q, k, v, mask, q.shape[3] ** -0.5, zeros_o, np.zeros((batch, q.shape[2],
                                                                        s_len)))[0]


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu_interpret"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_oracle(case, implementation):
    args, kwargs = make(case)
    got = jax.jit(lambda *a: decode.paged_decode_attention(
        *a, implementation=implementation, **kwargs))(*args)
    assert got.dtype == case[-1]
    want = _oracle(case, args)
    tol = TOL[case[-1]]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol, rtol=tol)


def test_split_k_merges_partials():
    case = CASES[0]
    args, kwargs = make(case)
    got = decode_kernel.paged_decode_attention(
        *args, layout=kwargs["layout"], scale=16**-0.5, v_head_dim=16,
        config=decode_kernel.Config(pages_per_split=2), interpret=True)
    np.testing.assert_allclose(np.asarray(got), _oracle(case, args), atol=2e-5, rtol=2e-5)


def test_loza_visits_only_sink_and_local_pages():
    layout = masks.LozaLayout(128, 1, 7)
    lengths = jnp.asarray([131072, 1000, 1], jnp.int32)
    pages, count = decode.visit_plan(layout, lengths, 1, 64, 2048)
    assert pages.shape[1] == decode.visit_width(layout, 1, 64, 2048) == 2 + 15 + 1
    pages, count = np.asarray(pages), np.asarray(count)
    # Long sequence: the 2 sink pages, then the pages of the last 7 LoZA blocks (14 pages).
    assert count[0] == 2 + 14
    np.testing.assert_array_equal(pages[0, :count[0]], [0, 1] + list(range(2034, 2048)))
    assert count[1] == 16 and count[2] == 1  # 1000 tokens: all 16 pages; 1 token: page 0


def test_pow2_chunks():
    assert decode_kernel.pow2_chunks(576) == ((0, 512), (512, 64))
    assert decode_kernel.pow2_chunks(128) == ((0, 128),)


def test_mla_decode_lowers_for_cuda():
    """Full-size absorbed MLA decode (128 heads, Dk 576 as 512 + 64, values shared with keys)
    lowers to one Triton kernel."""
    s = jax.ShapeDtypeStruct
    args = (s((4, 1, 128, 576), jnp.bfloat16), s((512, 64, 1, 576), jnp.bfloat16), None,
            s((4, 128), jnp.int32), s((4,), jnp.int32))

    def run(q, k_pages, tables, lengths):
        return decode_kernel.paged_decode_attention(
            q, k_pages, None, tables, lengths, layout=masks.LozaLayout(), scale=0.07,
            v_head_dim=512)

    with mock.patch.object(jax, "default_backend", lambda: "gpu"):
        text = jax.jit(run).trace(args[0], args[1], args[3], args[4]).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


def test_validation_names_the_bad_value():
    args, kwargs = make(CASES[0])
    with pytest.raises(ValueError, match="implementation='cuda'"):
        decode.paged_decode_attention(*args, implementation="cuda", layout=kwargs["layout"])
    with pytest.raises(ValueError, match="v_head_dim"):
        decode.paged_decode_attention(args[0], args[1], None, *args[3:], layout=kwargs["layout"])
