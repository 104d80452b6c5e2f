"""Grouped matmul for MoE experts: `gmm` (forward, differentiable) and `tgmm` (weight gradient).

Backends: "pallas_tpu", "megablox" (jax's TPU kernel), "pallas_gpu" (Pallas Triton lowering),
"triton" (jax-triton), "segments" (sorted row tiles in plain XLA: the CPU default and the
fallback elsewhere), "xla" (`jax.lax.ragged_dot`, the reference). See api.py.
"""

from pallas_kernels.grouped_matmul.api import (
    KNOWN_IMPLEMENTATIONS,
    available_implementations,
    backend_module,
    default_order,
    gmm,
    tgmm,
)
from pallas_kernels.grouped_matmul.reference import gmm_reference, tgmm_reference

__all__ = [
    "KNOWN_IMPLEMENTATIONS", "available_implementations", "backend_module", "default_order", "gmm",
    "tgmm", "gmm_reference", "tgmm_reference",
]
