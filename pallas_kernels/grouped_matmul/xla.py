"""The "xla" backend: `jax.lax.ragged_dot(_general)` at full precision; runs everywhere.

Every backend module exposes the same four names, which api.py composes (and differentiates):
  Config                         frozen knobs dataclass, or None when there are none
  check(lhs, rhs, *, out_dtype, config)        raise NotImplementedError for a case it can't run
  gmm(lhs, rhs, group_sizes, *, transpose_rhs, out_dtype, config)   -> [T, N]
  tgmm(lhs, rhs, group_sizes, *, out_dtype, config)                 -> [G, K, N]
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.grouped_matmul.reference import gmm_reference, tgmm_reference

Config = None


def check(lhs, rhs, *, out_dtype, config=None) -> None:
    del lhs, rhs, out_dtype
    if config is not None:
        raise NotImplementedError(f"implementation='xla' takes no config, got {config!r}")


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None, config=None):
    """lhs [T, K] x rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [T, N] in out_dtype."""
    check(lhs, rhs, out_dtype=out_dtype, config=config)
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    return gmm_reference(lhs, rhs, group_sizes, preferred_element_type=out_dtype)


def tgmm(lhs, rhs, group_sizes, *, out_dtype=None, config=None):
    """lhs [T, K], rhs [T, N] -> [G, K, N]: per-group lhs^T @ rhs, in out_dtype."""
    check(lhs, rhs, out_dtype=out_dtype, config=config)
    return tgmm_reference(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
