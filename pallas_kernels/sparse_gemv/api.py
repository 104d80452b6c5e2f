"""sparse_gemv: y = x @ w for activations with many zero channels; backends by `implementation=`.

Backends (modules <name>.py here; see xla.py for the interface) are filled by guarded imports;
each kernel backend also registers "<name>_interpret" (CPU CI runs those). `implementation=None`
tries the platform's default order, which ends with "xla" (the dense reference); kernels refuse
more than their MAX_ROWS rows (prefill), so None sends those to "xla". Naming an implementation
never falls back to another.
"""

from __future__ import annotations

from types import ModuleType

import jax.numpy as jnp
from jaxtyping import Array, Shaped

from pallas_kernels.registry import Registry

BACKENDS = ("pallas_gpu", "pallas_tpu", "xla_gather", "xla")
INTERPRET_BACKENDS = ("pallas_gpu", "pallas_tpu")
# Rows above which the default order skips the sparse kernels (decode has a few rows per step;
# the union of many rows' active channels approaches all of them).
MAX_ROWS = 16
# Which path is faster is a measurement (scripts/bench_sparse_gemv.py), not a belief: on CPU
# the gather path costs a copy of the active rows and loses to the dense matmul (BENCHMARKS.md);
# the TPU kernel DMAs one row per grid step (correct, untuned), so TPU stays on the dense path.
_DEFAULT_ORDER = {
    "cpu": ("xla",),
    "tpu": ("xla",),
    "gpu": ("pallas_gpu", "xla"),
}

REGISTRY = Registry(__package__, BACKENDS, _DEFAULT_ORDER, interpret=INTERPRET_BACKENDS,
                    load=lambda module, interpret: (module, interpret))
KNOWN_IMPLEMENTATIONS = REGISTRY.names


def available_implementations() -> tuple[str, ...]:
    """Registered backends, in KNOWN_IMPLEMENTATIONS order."""
    return REGISTRY.available()


def default_order(platform: str | None = None) -> tuple[str, ...]:
    """Registered backends tried by `implementation=None` on `platform` (default: jax's)."""
    return REGISTRY.default_order(platform)


def backend_module(implementation: str) -> ModuleType:
    """The module of a registered backend (its Config, default_config, search_space)."""
    return REGISTRY.get(implementation)[0]


def sparse_gemv(x: Shaped[Array, "T K"], w: Shaped[Array, "Kw N"], *,
                implementation: str | None = None, config=None) -> Shaped[Array, "T N"]:
    """y = x @ w (reference.py), reading only rows k of w with some x[:, k] != 0.

    Args:
      x: [T, K] float activations, mostly zero channels (thresholded FFN activations at decode).
      w: [K, N] float weights (cast to x.dtype), e.g. the FFN down projection [F, M].
      implementation: one of KNOWN_IMPLEMENTATIONS, or None for the platform's default order.
      config: the named backend's Config; default: its heuristic.

    Returns:
      [T, N] in x.dtype, float32 accumulation. Weight bytes read: (active rows / K) of a dense
      GEMV's for the sparse backends.
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"sparse_gemv: shapes x{tuple(x.shape)} w{tuple(w.shape)} do not match "
                         "[T, K] x [K, N]")
    if not jnp.issubdtype(x.dtype, jnp.floating) or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"sparse_gemv: x.dtype={x.dtype}, w.dtype={w.dtype}; expected floats "
                         "(quantized weights run lcjax.ops.quantized_matmul)")
    if x.shape[0] == 0 or w.shape[1] == 0 or x.shape[1] == 0:
        return jnp.zeros((x.shape[0], w.shape[1]), x.dtype)

    def attempt(name, value):
        module, interpret = value
        if config is not None and implementation is None:
            raise ValueError("sparse_gemv: a config needs a named implementation")
        if name not in ("xla", "xla_gather") and x.shape[0] > MAX_ROWS:
            raise NotImplementedError(f"{name}: {x.shape[0]} rows; supported: <= {MAX_ROWS}")
        module.check(x, w, config=config, interpret=interpret)
        return module.sparse_gemv(x, w, config=config, interpret=interpret)

    return REGISTRY.select(implementation, attempt)
