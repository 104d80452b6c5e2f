"""Block-sparse attention: layouts (masks.py), the jnp reference, `block_sparse_attention` (Pallas
GPU, Pallas TPU, Triton, cuDNN, splash, block-skipping XLA and reference backends) and
`paged_decode_attention`."""

from pallas_kernels.block_sparse_attention.api import (
    KNOWN_IMPLEMENTATIONS,
    available_implementations,
    block_sparse_attention,
    default_order,
)
from pallas_kernels.block_sparse_attention.decode import (
    paged_decode_attention,
    paged_decode_reference,
)
from pallas_kernels.block_sparse_attention.masks import (
    EMPTY,
    FULL,
    PARTIAL,
    AndLayout,
    BlockMaskLayout,
    BlockMetadata,
    CausalLayout,
    FullLayout,
    Layout,
    LozaLayout,
    OrLayout,
    SlidingWindowLayout,
)
from pallas_kernels.block_sparse_attention.reference import attention_reference, dense_mask

__all__ = [
    "KNOWN_IMPLEMENTATIONS", "available_implementations", "block_sparse_attention",
    "default_order", "EMPTY", "FULL", "PARTIAL", "AndLayout", "BlockMaskLayout", "BlockMetadata",
    "CausalLayout", "FullLayout", "Layout", "LozaLayout", "OrLayout", "SlidingWindowLayout",
    "attention_reference", "dense_mask", "paged_decode_attention", "paged_decode_reference",
]
