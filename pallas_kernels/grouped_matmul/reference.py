"""The definition of grouped matmul: `jax.lax.ragged_dot` ("xla"), plus float64 numpy loops.

Rows of lhs are sorted by group; group g owns rows [offsets[g], offsets[g+1]) with
offsets = [0, cumsum(group_sizes)]. Rows past sum(group_sizes) belong to no group: gmm gives 0
there and tgmm ignores them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

# float32 at full precision: on GPU/TPU the default would round through tf32/bf16.
_HIGHEST = jax.lax.Precision.HIGHEST

# tgmm as ragged_dot_general: contract the ragged row dimension, one [K, N] result per group.
_TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[])


def gmm_reference(lhs: Float[Array, "T K"], rhs: Float[Array, "G K N"],
                  group_sizes: Int[Array, "G"], *, preferred_element_type=None
                  ) -> Float[Array, "T N"]:
    """out[t] = lhs[t] @ rhs[group(t)]; 0 for rows past sum(group_sizes)."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), precision=_HIGHEST,
                              preferred_element_type=preferred_element_type)


def tgmm_reference(lhs: Float[Array, "T K"], rhs: Float[Array, "T N"],
                   group_sizes: Int[Array, "G"], *, preferred_element_type=None
                   ) -> Float[Array, "G K N"]:
    """out[g] = lhs[rows of g]^T @ rhs[rows of g]; 0 for empty groups (the weight gradient)."""
    return jax.lax.ragged_dot_general(lhs, rhs, group_sizes.astype(jnp.int32), _TGMM_DIMS,
                                      precision=_HIGHEST,
                                      preferred_element_type=preferred_element_type)


def numpy_offsets(group_sizes, num_rows: int) -> np.ndarray:
    """[0, cumsum(group_sizes)] clipped to num_rows, as int64."""
    ends = np.minimum(np.cumsum(np.asarray(group_sizes, np.int64)), num_rows)
    return np.concatenate([[0], ends])


def gmm_numpy(lhs, rhs, group_sizes) -> np.ndarray:
    """gmm as a float64 loop over groups (test oracle, no code shared with the kernels)."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    offsets = numpy_offsets(group_sizes, lhs.shape[0])
    for g in range(rhs.shape[0]):
        lo, hi = offsets[g], offsets[g + 1]
        out[lo:hi] = lhs[lo:hi] @ rhs[g]
    return out


def tgmm_numpy(lhs, rhs, group_sizes) -> np.ndarray:
    """tgmm as a float64 loop over groups (test oracle)."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    offsets = numpy_offsets(group_sizes, lhs.shape[0])
    return np.stack([lhs[offsets[g]:offsets[g + 1]].T @ rhs[offsets[g]:offsets[g + 1]]
                     for g in range(len(offsets) - 1)])
