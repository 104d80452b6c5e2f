"""The "segments" backend (the reference with row-tiled grouped products) against the contract,
and XLA's cost analysis of its grouped products: no contraction against every expert."""

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import segments as tiled
from pallas_kernels.quant_matmul import api
from pallas_kernels.quant_matmul.contract import QuantMatmulContract


class TestSegments(QuantMatmulContract):
    implementation = "segments"


def test_grouped_w8a8_costs_the_routed_flops_only(monkeypatch):
    """2,048 rows over 32 experts: ~1x the useful multiply-adds, where ragged_dot does ~32x.
    The tiles run as one batched einsum: XLA's cost analysis counts a loop body once."""
    default = tiled.default_config
    monkeypatch.setattr(tiled, "default_config", lambda *args, **kwargs: dataclasses.replace(
        default(*args, **kwargs), loop=False))
    rows, experts, k, n = 2048, 32, 128, 64
    args = (jax.ShapeDtypeStruct((rows, k), jnp.int8),
            jax.ShapeDtypeStruct((experts, k, n), jnp.int8),
            jax.ShapeDtypeStruct((experts,), jnp.int32),
            jax.ShapeDtypeStruct((experts, n), jnp.float32),
            jax.ShapeDtypeStruct((rows,), jnp.float32))

    def flops(implementation):
        fn = jax.jit(lambda x, w, sizes, ws, xs: api.quant_gmm(
            x, w, sizes, w_scale=ws, x_scale=xs, implementation=implementation))
        return fn.lower(*args).compile().cost_analysis()["flops"] / (2 * rows * k * n)

    assert api.default_order("cpu")[0] == "segments"
    ours, ragged = flops("segments"), flops("xla")
    assert ours <= 1.3 < experts / 2 <= ragged, (ours, ragged)
