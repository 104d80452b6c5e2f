"""grouped_matmul: `gmm` and `tgmm`, backends chosen by `implementation=`.

Backends (modules <name>.py here with check / gmm / tgmm: see xla.py) are found by
pallas_kernels.registry; the Pallas ones also run as "<name>_interpret". `implementation=None`
tries the platform's default order, which always ends with "xla" (`jax.lax.ragged_dot`, the
reference); naming an implementation never falls back to another, and a backend that cannot run
a case raises NotImplementedError naming the value and what it supports (with None and no
backend left, one error lists every backend's reason).

Every backend is differentiated by the same custom VJP, built from its own two kernels:
  d_lhs = gmm(d_out, rhs^T)   (rhs read transposed in place, no copy)
  d_rhs = tgmm(lhs, d_out)
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.registry import Registry

# Every backend; modules are <name>.py in this package. KNOWN_IMPLEMENTATIONS adds the
# "<name>_interpret" variants of INTERPRET_BACKENDS.
BACKENDS = (
    "pallas_tpu", "megablox", "pallas_gpu", "triton", "segments", "xla")
# Which GPU kernel is faster is a measurement (scripts/bench_gmm.py), not a belief.
# "segments" (sorted row tiles in plain XLA) is the CPU default and the fallback before
# ragged_dot everywhere. On TPU ours precedes megablox until device_check / bench_gmm measure.
_DEFAULT_ORDER = {
    "cpu": ("segments", "xla"),
    "tpu": ("pallas_tpu", "megablox", "segments", "xla"),
    "gpu": ("pallas_gpu", "triton", "segments", "xla"),
}
# Pallas backends that also register "<name>_interpret": every call's Config gets
# interpret=True (the Pallas interpreter runs the same kernels; CPU CI). triton interprets
# through TRITON_INTERPRET=1 instead.
INTERPRET_BACKENDS = ("pallas_tpu", "megablox", "pallas_gpu")
SUPPORTED_KERNEL_DTYPES = (jnp.bfloat16, jnp.float32)


class _Interpreted:
    """A backend module whose calls run in the Pallas interpreter (Config.interpret=True); its
    other attributes (Config, default_config, search_space) are the module's."""

    def __init__(self, module: ModuleType):
        self.module = module

    def __getattr__(self, name: str):
        return getattr(self.module, name)

    def _config(self, config, num_rows, k_dim, n_dim, num_groups, dtype, kind="gmm"):
        if config is None:
            config = self.module.default_config(num_rows, k_dim, n_dim, num_groups, dtype, kind)
        return dataclasses.replace(config, interpret=True)

    def check(self, lhs, rhs, *, out_dtype, config=None) -> None:
        config = dataclasses.replace(config or self.module.Config(), interpret=True)
        self.module.check(lhs, rhs, out_dtype=out_dtype, config=config)

    def gmm(self, lhs, rhs, group_sizes, *, transpose_rhs=False, out_dtype=None, config=None):
        n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
        config = self._config(config, lhs.shape[0], lhs.shape[1], n_dim, rhs.shape[0], lhs.dtype)
        return self.module.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                               out_dtype=out_dtype, config=config)

    def tgmm(self, lhs, rhs, group_sizes, *, out_dtype=None, config=None):
        config = self._config(config, lhs.shape[0], lhs.shape[1], rhs.shape[1],
                              group_sizes.shape[0], lhs.dtype, kind="tgmm")
        return self.module.tgmm(lhs, rhs, group_sizes, out_dtype=out_dtype, config=config)


# Backends are modules <name>.py here (the module itself is registered).
REGISTRY = Registry(__package__, BACKENDS, _DEFAULT_ORDER,
                    interpret=INTERPRET_BACKENDS,
                    load=lambda module, interpret: _Interpreted(module) if interpret else module)
KNOWN_IMPLEMENTATIONS = REGISTRY.names


def available_implementations() -> tuple[str, ...]:
    """Registered backends, in KNOWN_IMPLEMENTATIONS order."""
    return REGISTRY.available()


def default_order(platform: str | None = None) -> tuple[str, ...]:
    """Registered backends tried by `implementation=None` on `platform` (default: jax's)."""
    return REGISTRY.default_order(platform)


def backend_module(implementation: str):
    """The module of a registered backend (its Config, default_config, search_space, kernels);
    for "<name>_interpret", the module seen through the interpreter."""
    return REGISTRY.get(implementation)


def gmm(
    lhs: Float[Array, "T K"],
    rhs: Float[Array, "G K N"],
    group_sizes: Int[Array, "G"],
    *,
    preferred_element_type=None,
    implementation: str | None = None,
    config=None,
) -> Float[Array, "T N"]:
    """Grouped matmul: out[t] = lhs[t] @ rhs[g(t)], rows sorted by group.

    Args:
      lhs: [T, K] rows sorted by group; group g owns the next group_sizes[g] rows.
      rhs: [G, K, N] one weight per group, same dtype as lhs.
      group_sizes: int [G], >= 0. Rows past sum(group_sizes) belong to no group and give 0 (and
        zero gradient); a sum past T is clipped to T.
      preferred_element_type: output dtype (default lhs.dtype); kernels accumulate in float32.
      implementation: one of KNOWN_IMPLEMENTATIONS, or None for the platform's default order.
      config: the named backend's Config (block sizes, warps, stages, interpret); default: its
        heuristic for each call's shape (forward and both backward products).

    Returns:
      [T, N] in preferred_element_type. Cost 2*T*K*N flops; weights read about once.
      Differentiable in lhs and rhs (custom VJP: gmm with rhs transposed, and tgmm).
    """
    out_dtype = _validate(lhs, rhs, group_sizes, (lhs.shape[1], rhs.shape[1]),
                          preferred_element_type, implementation, config)
    if 0 in lhs.shape or 0 in rhs.shape:
        return jnp.zeros((lhs.shape[0], rhs.shape[2]), out_dtype)
    backend = _choose(implementation, lhs, rhs, out_dtype, config)
    return _differentiable_gmm(backend, out_dtype, config)(lhs, rhs, group_sizes)


def tgmm(
    lhs: Float[Array, "T K"],
    rhs: Float[Array, "T N"],
    group_sizes: Int[Array, "G"],
    *,
    preferred_element_type=None,
    implementation: str | None = None,
    config=None,
) -> Float[Array, "G K N"]:
    """Transposed grouped matmul (gmm's weight gradient): out[g] = lhs[rows g]^T @ rhs[rows g].

    Args as in `gmm`, with rhs [T, N] sorted like lhs. Empty groups give 0; rows past
    sum(group_sizes) are ignored. Not differentiable through the kernel backends.

    Returns:
      [G, K, N] in preferred_element_type (default lhs.dtype).
    """
    out_dtype = _validate(lhs, rhs, group_sizes, (lhs.shape[0], rhs.shape[0]),
                          preferred_element_type, implementation, config)
    if 0 in lhs.shape or 0 in rhs.shape:
        return jnp.zeros((group_sizes.shape[0], lhs.shape[1], rhs.shape[1]), out_dtype)
    backend = _choose(implementation, lhs, rhs, out_dtype, config)
    return backend.tgmm(lhs, rhs, group_sizes.astype(jnp.int32), out_dtype=out_dtype,
                        config=config)


def _choose(implementation, lhs, rhs, out_dtype, config):
    """The backend to run: the named one (or its NotImplementedError), else the first in the
    default order whose check passes."""

    def attempt(name, backend):
        backend.check(lhs, rhs, out_dtype=out_dtype, config=config)
        return backend

    return REGISTRY.select(implementation, attempt)


def _differentiable_gmm(backend: ModuleType | _Interpreted, out_dtype, config):
    """backend.gmm with the VJP built from the backend's own gmm (transposed rhs) and tgmm."""

    @jax.custom_vjp
    def gmm_fn(lhs, rhs, group_sizes):
        return backend.gmm(lhs, rhs, group_sizes.astype(jnp.int32), transpose_rhs=False,
                           out_dtype=out_dtype, config=config)

    def fwd(lhs, rhs, group_sizes):
        return gmm_fn(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)

    def bwd(residuals, d_out):
        lhs, rhs, group_sizes = residuals
        group_sizes = group_sizes.astype(jnp.int32)
        # Kernels take one input dtype; a float32 d_out of a bf16 gmm is rounded to bf16 here.
        d_out = d_out.astype(lhs.dtype)
        d_lhs = backend.gmm(d_out, rhs, group_sizes, transpose_rhs=True, out_dtype=lhs.dtype,
                            config=config)
        d_rhs = backend.tgmm(lhs, d_out, group_sizes, out_dtype=rhs.dtype, config=config)
        return d_lhs, d_rhs, None

    gmm_fn.defvjp(fwd, bwd)
    return gmm_fn


def _validate(lhs, rhs, group_sizes, paired_dims, preferred_element_type, implementation,
              config):
    """Check ranks, dims and dtypes; return the output dtype."""
    if getattr(group_sizes, "ndim", None) != 1 or group_sizes.shape[0] == 0:
        raise ValueError(f"group_sizes must have shape [G] with G >= 1, got "
                         f"{getattr(group_sizes, 'shape', type(group_sizes))}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes.dtype={group_sizes.dtype} must be an integer dtype")
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}.dtype={x.dtype} must be floating")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"lhs.dtype={lhs.dtype} != rhs.dtype={rhs.dtype}; cast them to one "
                         "dtype")
    if paired_dims[0] != paired_dims[1]:
        raise ValueError(f"lhs {lhs.shape} and rhs {rhs.shape} disagree on the contracted / row "
                         f"dimension ({paired_dims[0]} vs {paired_dims[1]})")
    if rhs.ndim == 3 and rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(f"rhs has {rhs.shape[0]} groups but group_sizes has "
                         f"{group_sizes.shape[0]}")
    if config is not None and implementation is None:
        raise ValueError(f"config={config!r} needs a named implementation= (configs are per "
                         "backend)")
    if preferred_element_type is None:
        return lhs.dtype
    out_dtype = jnp.dtype(preferred_element_type)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"preferred_element_type={preferred_element_type!r} must be a float "
                         "dtype")
    return out_dtype
