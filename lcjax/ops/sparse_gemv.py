"""Sparse GEMV for thresholded activations: x @ w reading only the rows of w with active inputs.

Forwards to `pallas_kernels.sparse_gemv.sparse_gemv`. The model calls it for the FFN down
projection when activation thresholds are present and a step has at most `MAX_ROWS` rows
(decode); `implementation=None` takes the platform's default order (the Pallas kernel on GPU,
the dense matmul where a sparse path has not measured faster). Forward only (no VJP): decode.
"""

from __future__ import annotations

from jaxtyping import Array, Float

from pallas_kernels.sparse_gemv import KNOWN_IMPLEMENTATIONS, MAX_ROWS, sparse_gemv

IMPLEMENTATIONS = KNOWN_IMPLEMENTATIONS

__all__ = ["IMPLEMENTATIONS", "MAX_ROWS", "sparse_matmul"]


def sparse_matmul(x: Float[Array, "... K"], w: Float[Array, "K N"], *,
                  implementation: str | None = None) -> Float[Array, "... N"]:
    """x @ w over x's leading dims (flattened to rows; at most MAX_ROWS for the kernels), in
    x.dtype with float32 accumulation. Cost: 2·rows·(active K)·N flops and the active rows' bytes."""
    rows = x.reshape(-1, x.shape[-1])
    y = sparse_gemv(rows, w.astype(x.dtype), implementation=implementation)
    return y.reshape(x.shape[:-1] + (w.shape[-1],))
