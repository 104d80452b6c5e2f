"""Grouped (ragged) matmul for MoE experts: rows sorted by group times a per-group weight.

Forwards to `pallas_kernels.grouped_matmul.gmm` (differentiable: its custom VJP uses the same
backend's kernels for both gradients). `implementation=None` takes the platform's best available
backend: "segments" (sorted row tiles: the rows' own FLOPs plus a little tile padding) on CPU,
the Pallas kernels on GPU/TPU.
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_matmul import KNOWN_IMPLEMENTATIONS, gmm

IMPLEMENTATIONS = KNOWN_IMPLEMENTATIONS

__all__ = ["IMPLEMENTATIONS", "grouped_matmul"]


def grouped_matmul(x: Float[Array, "N K"], w: Float[Array, "G K F"], group_sizes: Int[Array, "G"],
                   *, implementation: str | None = None) -> Float[Array, "N F"]:
    """out[i] = x[i] @ w[g(i)], rows grouped contiguously; rows past sum(group_sizes) give 0.

    Args:
      x: [N, K] rows sorted by group (N = tokens * top_k slots in the MoE).
      w: [G, K, F] per-group weights, cast to x.dtype (the compute dtype).
      group_sizes: int [G] rows per group.
      implementation: a pallas_kernels.grouped_matmul backend (IMPLEMENTATIONS), or None for
        the platform's default order (ends with "xla").

    Returns:
      [N, F] in x.dtype, accumulated in float32 by the kernels. Cost 2*N*K*F flops.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"grouped_matmul: implementation={implementation!r} is not one of "
                         f"{list(IMPLEMENTATIONS)} (or None for the platform default)")
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1] or group_sizes.shape != (w.shape[0],):
        raise ValueError(f"grouped_matmul: shapes x{x.shape} w{w.shape} group_sizes"
                         f"{group_sizes.shape} do not match [N,K] x [G,K,F] with [G] sizes")
    return gmm(x, w.astype(x.dtype), group_sizes, implementation=implementation)
