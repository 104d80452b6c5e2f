"""The "tpu_paged" decode backend: refusals everywhere, argument translation against the paged
reference on any platform (through the kernel's definition written in numpy), the kernel on TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import decode, masks

tpu_paged = pytest.importorskip("pallas_kernels.block_sparse_attention.decode_tpu_paged")

_ON_TPU = jax.default_backend() == "tpu"


def _inputs(groups, d_k, d_v, seed=0):
    rng = np.random.default_rng(seed)
    batch, page, max_pages, heads = 3, 8, 4, 4
    num_pages = batch * max_pages + 2
    tables = np.stack([rng.permutation(num_pages)[:max_pages] for _ in range(batch)])
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, d_k)), jnp.float32)
    k_pages = jnp.asarray(rng.standard_normal((num_pages, page, groups, d_k)), jnp.float32)
    v_pages = None if d_v is None else jnp.asarray(
        rng.standard_normal((num_pages, page, groups, d_v)), jnp.float32)
    lengths = jnp.asarray([29, 3, 32], jnp.int32)
    return q, k_pages, v_pages, jnp.asarray(tables, jnp.int32), lengths


def _kernel_definition(q, k_pages, v_pages, lengths, page_indices):
    """The TPU kernel's result, from its definition: per sequence, unscaled softmax attention of
    q [B, H, D] over its first `lengths[b]` tokens; kv heads lead the pools [G, P, L, D]."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    batch, heads, _ = q.shape
    groups = k_pages.shape[0]
    out = np.zeros((batch, heads, v_pages.shape[3]))
    for b in range(batch):
        n = int(lengths[b])
        for h in range(heads):
            g = h // (heads // groups)
            k = k_pages[g, np.asarray(page_indices[b])].reshape(-1, k_pages.shape[3])[:n]
            v = v_pages[g, np.asarray(page_indices[b])].reshape(-1, v_pages.shape[3])[:n]
            s = k @ q[b, h]
            p = np.exp(s - s.max())
            out[b, h] = p @ v / p.sum()
    return out


@pytest.mark.parametrize("groups, d_k, d_v", [(2, 16, 16), (1, 24, None)],
                         ids=["gqa", "absorbed_mla"])
def test_translated_arguments_give_the_reference(groups, d_k, d_v):
    q, k_pages, v_pages, tables, lengths = _inputs(groups, d_k, d_v)
    v_head_dim = 16 if d_v is None else None
    args, block = tpu_paged.kernel_arguments(q, k_pages, v_pages, tables, lengths,
                                             layout=masks.CausalLayout(), scale=0.3)
    assert tables.shape[1] % block == 0
    got = _kernel_definition(*args)[:, None, :, :v_head_dim or d_v]
    want = decode.paged_decode_reference(q, k_pages, v_pages, tables, lengths,
                                         layout=masks.CausalLayout(), scale=0.3,
                                         v_head_dim=v_head_dim or d_v)
    np.testing.assert_allclose(got, np.asarray(want), rtol=2e-5, atol=2e-5)


def test_refusals():
    q, k_pages, v_pages, tables, lengths = _inputs(2, 16, 16)
    kwargs = dict(layout=masks.CausalLayout(), scale=0.3)
    with pytest.raises(NotImplementedError, match="S == 1"):
        tpu_paged.kernel_arguments(jnp.concatenate([q, q], 1), k_pages, v_pages, tables,
                                   lengths, **kwargs)
    with pytest.raises(NotImplementedError, match="LozaLayout"):
        tpu_paged.kernel_arguments(q, k_pages, v_pages, tables, lengths,
                                   layout=masks.LozaLayout(8, 1, 1), scale=0.3)
    if not _ON_TPU:
        with pytest.raises(NotImplementedError, match="platform"):
            tpu_paged.paged_decode_attention(q, k_pages, v_pages, tables, lengths,
                                             v_head_dim=16, **kwargs)


def test_registered_first_on_tpu():
    assert "tpu_paged" in decode.REGISTRY.available()
    assert decode.REGISTRY.default_order("tpu") == ("tpu_paged", "xla")


@pytest.mark.skipif(not _ON_TPU, reason="the kernel runs on TPU only")
def test_kernel_matches_the_reference_on_tpu():
    q, k_pages, _, tables, lengths = _inputs(1, 128, None)
    kwargs = dict(layout=masks.CausalLayout(), scale=0.1, v_head_dim=128)
    got = decode.paged_decode_attention(q, k_pages, None, tables, lengths,
                                        implementation="tpu_paged", **kwargs)
    want = decode.paged_decode_reference(q, k_pages, None, tables, lengths, **kwargs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-2, atol=1e-2)
