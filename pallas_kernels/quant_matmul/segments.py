"""The "segments" backend: the reference, with quant_gmm's grouped products run as sorted row
tiles (pallas_kernels.grouped_matmul.segments) instead of `jax.lax.ragged_dot`, which on CPU
contracts every row against every expert. Same interface as xla.py; the CPU default."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.grouped_matmul import segments as tiled
from pallas_kernels.quant_matmul.reference import quant_gmm_reference, quant_matmul_reference

Config = None


def check(x, w, *, mode, out_dtype, grouped, config=None, interpret=False) -> None:
    del x, w, mode, out_dtype, grouped, interpret
    if config is not None:
        raise NotImplementedError(f"implementation='segments' takes no config, got {config!r}")


def _ragged_dot(lhs, rhs, group_sizes, *, precision=None, preferred_element_type=None):
    """`jax.lax.ragged_dot`'s call, as row tiles (int8 accumulates in int32, floats in float32
    at full precision whatever `precision` says)."""
    del precision
    out_dtype = lhs.dtype if preferred_element_type is None else jnp.dtype(preferred_element_type)
    return tiled.gmm(lhs, rhs, group_sizes, out_dtype=out_dtype)


def quant_matmul(x, w, w_scale, x_scale, *, mode, alpha, out_dtype, config=None,
                 interpret=False):
    check(x, w, mode=mode, out_dtype=out_dtype, grouped=False, config=config)
    return quant_matmul_reference(x, w, w_scale, x_scale, mode=mode, alpha=alpha,
                                  out_dtype=out_dtype)


def quant_gmm(x, w, group_sizes, w_scale, x_scale, *, mode, alpha, out_dtype, config=None,
              interpret=False):
    check(x, w, mode=mode, out_dtype=out_dtype, grouped=True, config=config)
    return quant_gmm_reference(x, w, group_sizes, w_scale, x_scale, mode=mode, alpha=alpha,
                               out_dtype=out_dtype, ragged_dot=_ragged_dot)
