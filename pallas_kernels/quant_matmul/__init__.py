"""Quantized matmul: W8A8, W4A8 with float or integer (Integer Scale) group scales, W4A16, and
their grouped (MoE) variants.

Backends: "pallas_gpu" (Pallas Triton lowering), "pallas_tpu" (Mosaic), "triton" (jax-triton),
each also as "<name>_interpret", and "xla" (the reference). See api.py; reference.py defines
the math and the int32 bounds.
"""

from pallas_kernels.quant_matmul.api import (
    KNOWN_IMPLEMENTATIONS,
    available_implementations,
    backend_module,
    default_order,
    quant_gmm,
    quant_matmul,
)
from pallas_kernels.quant_matmul.reference import (
    Mode,
    accumulator_bound,
    pack_int4,
    quant_gmm_reference,
    quant_matmul_reference,
    unpack_int4,
)

__all__ = [
    "KNOWN_IMPLEMENTATIONS", "Mode", "accumulator_bound", "available_implementations",
    "backend_module", "default_order", "pack_int4", "quant_gmm", "quant_gmm_reference",
    "quant_matmul", "quant_matmul_reference", "unpack_int4",
]
