"""Model-facing attention op: forwards to `pallas_kernels.block_sparse_attention`.

Model code builds a layout with `layout_for` (or one of the re-exported layout classes) and calls
`attention(...)`; the backend is chosen by `implementation=`, never by branches in the model.
"""

from __future__ import annotations

from jaxtyping import Array, Float, Int

from lcjax.config import LozaConfig
from pallas_kernels.block_sparse_attention import (
    BlockMaskLayout,
    CausalLayout,
    FullLayout,
    Layout,
    LozaLayout,
    SlidingWindowLayout,
    block_sparse_attention,
)
from pallas_kernels.block_sparse_attention.decode import paged_decode_attention
from pallas_kernels.block_sparse_attention.xla_blocked import document_positions

__all__ = ["attention", "document_positions", "layout_for", "paged_decode_attention",
           "sequence_positions", "BlockMaskLayout", "CausalLayout", "FullLayout", "Layout",
           "LozaLayout", "SlidingWindowLayout"]


def layout_for(sparse: bool, loza: LozaConfig) -> Layout:
    """The mask of one attention sublayer: LoZA sink + local blocks if `sparse`, else causal."""
    if not sparse:
        return CausalLayout()
    return LozaLayout(block_size=loza.block_size, sink_blocks=loza.sink_blocks,
                      local_blocks=loza.local_blocks)


def sequence_positions(layout: Layout,
                       segment_ids: Int[Array, "B S"] | None) -> Int[Array, "B S"] | None:
    """Mask positions for a sequence attending to itself: None (aranges, so kernels plan their
    blocks from static shapes) unless packed documents meet a layout that depends on absolute
    positions (LoZA's sink blocks); then positions restarting at each document.

    Causal, window and full layouts see only position differences, equal to index differences
    within a document (segment ids in contiguous runs), so aranges give the same mask.
    """
    if segment_ids is None or isinstance(layout, (CausalLayout, SlidingWindowLayout,
                                                  FullLayout)):
        return None
    return document_positions(segment_ids)


def attention(
    q: Float[Array, "B S H Dk"],
    k: Float[Array, "B T G Dk"],
    v: Float[Array, "B T G Dv"],
    *,
    layout: Layout,
    q_positions: Int[Array, "B S"] | None = None,
    kv_positions: Int[Array, "B T"] | None = None,
    q_segment_ids: Int[Array, "B S"] | None = None,
    kv_segment_ids: Int[Array, "B T"] | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
) -> Float[Array, "B S H Dv"] | tuple[Float[Array, "B S H Dv"], Float[Array, "B H S"]]:
    """softmax(scale * q k^T | layout, segments, non-empty slots) v, grouped kv heads.

    Args:
      q, k, v: [B, S, H, Dk], [B, T, G, Dk], [B, T, G, Dv] in one float dtype; H % G == 0.
        MLA prefill uses G = H (Dk=192, Dv=128); absorbed MLA decode G = 1 (Dk=576, Dv=512).
      layout: from `layout_for`, evaluated on absolute positions.
      q_positions, kv_positions: [B, S] / [B, T] int; default arange. Decode passes cache-slot
        positions, -1 for empty slots (never attended).
      q_segment_ids, kv_segment_ids: packed-sequence ids, both or neither.
      scale: softmax scale, default Dk ** -0.5 (MLA passes its YaRN-adjusted value).
      return_lse: also return the float32 log-sum-exp [B, H, S].
      implementation: a backend of `block_sparse_attention` ("xla": block-skipping plain XLA;
        "reference": the dense definition; kernels: "pallas_gpu", "pallas_tpu", "triton",
        "cudnn", "splash", "*_interpret"), or None for the platform's fastest.

    Returns:
      [B, S, H, Dv] in q.dtype (and lse if requested); rows with no visible key are 0.
    """
    return block_sparse_attention(
        q, k, v, layout=layout, q_positions=q_positions, kv_positions=kv_positions,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
        return_lse=return_lse, implementation=implementation)
