"""Sparse GEMV for activation sparsity: y = x @ w reading only the rows of w whose input
channel is nonzero in some row of x (decode: a few rows, about half the channels zero).

Backends: "pallas_gpu" (Pallas Triton lowering), "pallas_tpu" (Mosaic), each also as
"<name>_interpret", "xla_gather" (gather the active rows, then a matmul; jnp) and "xla" (the
reference: a dense matmul). See api.py; reference.py defines the result.
"""

from pallas_kernels.sparse_gemv.api import (
    KNOWN_IMPLEMENTATIONS,
    MAX_ROWS,
    available_implementations,
    backend_module,
    default_order,
    sparse_gemv,
)
from pallas_kernels.sparse_gemv.reference import active_rows, sparse_gemv_reference

__all__ = ["KNOWN_IMPLEMENTATIONS", "MAX_ROWS", "active_rows", "available_implementations",
           "backend_module", "default_order", "sparse_gemv", "sparse_gemv_reference"]
