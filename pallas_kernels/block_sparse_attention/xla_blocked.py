"""The "xla" backend: plain-jnp attention that visits only the active (query block, key block)
pairs, so a causal layer costs about half the square and a LoZA layer only its sink and local
blocks. Differentiable by ordinary autodiff; runs on every platform.

How: the pairs come from the layout's host-side block metadata (static shapes). Each pair's
scores [bq, bk] are computed at the default matmul precision with float32 statistics, masked
elementwise (layout on positions, segment ids, empty slots), and combined per query block with a
segment max and segment sums (the log-sum-exp of FlashAttention, without the loop).

Memory: all active pairs at once, i.e. float32 scores for the active fraction of [B, H, S, T]
(about half for causal) plus each query block copied once per active key block (nq / 2 copies
of q for causal). Fine at CPU training shapes; the kernels are the long-context path.

Positions. With default positions (arange) any layout and any S, T are served from the layout's
plan. With explicit positions (S == T, the model's packed training and prefill) the plan is built
for one of two cases and checked per batch row at run time:
  * global positions: q_positions[i] == i and kv_positions[j] in {j, < 0 (empty)};
  * document positions: equal q/kv segment ids in contiguous runs, positions restarting at 0 in
    each run (`document_positions`), kv positions possibly < 0 (empty).
Causal, sliding-window and full layouts depend only on position differences, so the global plan
covers both; a LoZA layout visits its local window plus, per query block, the sink of the
document its first query belongs to (a dynamic slice). A row matching neither case gets NaN
output (loud, not silently wrong). Explicit positions with S != T (decode or chunked prefill
over cache slots) attend densely with the element mask (the reference): every pair is visited
anyway, and square blocks would pad a few decode queries to a whole block of rows. Layouts other
than those four with explicit S == T positions raise NotImplementedError, and the default order
falls through to the reference.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.reference import attention_reference

__all__ = ["Config", "block_sparse_attention", "default_config", "document_positions",
           "pair_count"]

NAME = "xla"


@dataclasses.dataclass(frozen=True)
class Config:
    """Square block edge of the pair grid (queries and keys)."""

    block: int = 128

    def __post_init__(self):
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise ValueError(f"Config.block={self.block!r} must be a positive integer")


def default_config(s_len: int, t_len: int, layout: masks.Layout) -> Config:
    """128 (64 below 2k tokens: a finer causal staircase), a LoZA layout's own block size when
    smaller, and no larger than the (power-of-two rounded) sequence."""
    block = 128 if max(s_len, t_len) >= 2048 else 64
    if isinstance(layout, masks.LozaLayout):
        block = min(block, layout.block_size)
    return Config(block=max(1, min(block, 1 << max(0, (max(s_len, t_len) - 1).bit_length()))))


def document_positions(segment_ids: Int[Array, "B S"]) -> Int[Array, "B S"]:
    """Positions that restart at 0 wherever the segment id changes (packed documents)."""
    idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


# ---- host-side pair lists ----

def _static_pairs(layout: masks.Layout, s_len: int, t_len: int, block: int):
    """(query block, key block) of every non-empty block of `layout` on aranges, as int32."""
    meta = layout.block_metadata(s_len, t_len, block, block)
    qb, kb = np.nonzero(meta.block_state != masks.EMPTY)
    return qb.astype(np.int32), kb.astype(np.int32)


def _local_pairs(nq: int, nk: int, back: int):
    """Key blocks qb - back .. qb of every query block qb (clipped to the grid)."""
    qb = np.repeat(np.arange(nq), back + 1)
    kb = qb - np.tile(np.arange(back, -1, -1), nq)
    keep = (kb >= 0) & (kb < nk)
    return qb[keep].astype(np.int32), kb[keep].astype(np.int32)


def _explicit_plan(layout: masks.Layout, s_len: int, block: int):
    """Static pairs plus (LoZA only) the number of sink chunks per query block, for explicit
    positions; raises NotImplementedError for layouts whose plan depends on absolute positions."""
    nq = math.ceil(s_len / block)
    if isinstance(layout, (masks.CausalLayout, masks.SlidingWindowLayout, masks.FullLayout)):
        return _static_pairs(layout, s_len, s_len, block), 0, 0
    if isinstance(layout, masks.LozaLayout):
        # A local key lies less than local_blocks * block_size tokens behind its query.
        back = math.ceil((layout.local_blocks * layout.block_size - 1) / block)
        sink_chunks = math.ceil(layout.sink_blocks * layout.block_size / block)
        return _local_pairs(nq, nq, back), sink_chunks, back
    raise NotImplementedError(
        f"{NAME}: layout={layout!r} with explicit positions is not supported; supported: "
        "Causal, SlidingWindow, Full and Loza layouts (any layout with default positions)")


def pair_count(layout: masks.Layout, s_len: int, t_len: int, *, explicit_positions: bool = False,
               config: Config | None = None) -> int:
    """Block pairs this backend computes for the case (for cost tests and benchmarks)."""
    config = config or default_config(s_len, t_len, layout)
    if not explicit_positions:
        return len(_static_pairs(layout, s_len, t_len, config.block)[0])
    if s_len != t_len:
        return math.ceil(s_len / config.block) * math.ceil(t_len / config.block)
    (qb, _), sink_chunks, _ = _explicit_plan(layout, s_len, config.block)
    return len(qb) + sink_chunks * math.ceil(s_len / config.block)


# ---- the computation ----

def block_sparse_attention(q, k, v, *, layout, q_positions=None, kv_positions=None,
                           q_segment_ids=None, kv_segment_ids=None, scale, return_lse=False,
                           config: Config | None = None):
    """See `api.block_sparse_attention`; `config` overrides the block size heuristic."""
    batch, s_len, num_heads, _ = q.shape
    t_len, num_groups = k.shape[1], k.shape[2]
    config = config or default_config(s_len, t_len, layout)
    block = config.block
    explicit = q_positions is not None or kv_positions is not None
    sink_chunks = back = 0
    if not explicit:
        q_blk, k_blk = _static_pairs(layout, s_len, t_len, block)
        q_positions = jnp.broadcast_to(jnp.arange(s_len, dtype=jnp.int32), (batch, s_len))
        kv_positions = jnp.broadcast_to(jnp.arange(t_len, dtype=jnp.int32), (batch, t_len))
    else:
        if q_positions is None or kv_positions is None:
            raise NotImplementedError(
                f"{NAME}: explicit positions need both q and kv positions, got q_positions="
                f"{_shape(q_positions)}, kv_positions={_shape(kv_positions)}")
        if s_len != t_len:  # cache slots: every pair, masked, without padding the queries
            return attention_reference(
                q, k, v, layout=layout, q_positions=q_positions, kv_positions=kv_positions,
                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
                return_lse=return_lse)
        (q_blk, k_blk), sink_chunks, back = _explicit_plan(layout, s_len, block)
    nq, nk = math.ceil(s_len / block), math.ceil(t_len / block)
    s_pad, t_pad = nq * block, nk * block
    has_seg = q_segment_ids is not None

    # Pad to whole blocks; padded keys get position -1 (never attended).
    q_pos = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, s_pad - s_len)))
    kv_pos = jnp.pad(kv_positions.astype(jnp.int32), ((0, 0), (0, t_pad - t_len)),
                     constant_values=-1)
    q_p = jnp.pad(q, ((0, 0), (0, s_pad - s_len), (0, 0), (0, 0)))
    k_p = jnp.pad(k, ((0, 0), (0, t_pad - t_len), (0, 0), (0, 0)))
    v_p = jnp.pad(v, ((0, 0), (0, t_pad - t_len), (0, 0), (0, 0)))
    zeros_s = jnp.zeros((batch, s_pad), jnp.int32)
    q_seg = zeros_s if not has_seg else jnp.pad(q_segment_ids.astype(jnp.int32),
                                                ((0, 0), (0, s_pad - s_len)))
    kv_seg = (jnp.zeros((batch, t_pad), jnp.int32) if not has_seg else
              jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t_len))))

    # Key indices [B, P, bk] of every pair: static blocks, then (LoZA, explicit) sink chunks.
    key_idx = jnp.asarray(k_blk[:, None] * block + np.arange(block)[None, :])
    key_idx = jnp.broadcast_to(key_idx, (batch,) + key_idx.shape)
    key_pos = jnp.take_along_axis(kv_pos, key_idx.reshape(batch, -1), axis=1)
    key_pos = key_pos.reshape(key_idx.shape)
    pair_q = q_blk
    if sink_chunks:
        sink_idx, sink_pos = _sink_keys(layout, q_pos, kv_pos, nq, block, sink_chunks, back,
                                        t_len)
        key_idx = jnp.concatenate([key_idx, sink_idx], axis=1)
        key_pos = jnp.concatenate([key_pos, sink_pos], axis=1)
        pair_q = np.concatenate([q_blk, np.repeat(np.arange(nq, dtype=np.int32), sink_chunks)])
    num_pairs = len(pair_q)
    flat_idx = key_idx.reshape(batch, -1)

    def gather_keys(x):  # [B, T_pad, ...] -> [B, P, bk, ...]
        rows = jnp.take_along_axis(x, flat_idx.reshape(flat_idx.shape + (1,) * (x.ndim - 2)),
                                   axis=1)
        return rows.reshape((batch, num_pairs, block) + x.shape[2:])

    n_rep = num_heads // num_groups
    q_pairs = q_p.reshape(batch, nq, block, num_groups, n_rep, -1)[:, pair_q]  # [B,P,bq,G,N,D]
    k_pairs, v_pairs = gather_keys(k_p), gather_keys(v_p)  # [B, P, bk, G, D]
    q_pos_pairs = q_pos.reshape(batch, nq, block)[:, pair_q]  # [B, P, bq]
    mask_bpqk = layout.allowed(q_pos_pairs[..., :, None], key_pos[..., None, :])
    if has_seg:
        q_seg_pairs = q_seg.reshape(batch, nq, block)[:, pair_q]
        mask_bpqk &= q_seg_pairs[..., :, None] == gather_keys(kv_seg)[..., None, :]

    # Scores at the default precision, accumulated in float32 (softmax statistics need it).
    acc = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("BPQGND,BPKGD->BPGNQK", q_pairs, k_pairs,
                        preferred_element_type=acc) * scale
    scores = jnp.where(mask_bpqk[:, :, None, None], scores, -jnp.inf)
    # The row max over all pairs of a query block only stabilises exp: no gradient through it.
    pair_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1))  # [B, P, G, N, Q]
    row_max = jax.ops.segment_max(jnp.moveaxis(pair_max, 1, 0), pair_q, num_segments=nq)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # empty rows: exp(-inf - 0) = 0
    probs = jnp.exp(scores - jnp.moveaxis(row_max[pair_q], 0, 1)[..., None])
    out_p = jnp.einsum("BPGNQK,BPKGD->BPGNQD", probs.astype(v.dtype), v_pairs,
                       preferred_element_type=acc)
    denom = jax.ops.segment_sum(jnp.moveaxis(jnp.sum(probs, axis=-1), 1, 0), pair_q,
                                num_segments=nq)  # [nq, B, G, N, Q]
    out = jax.ops.segment_sum(jnp.moveaxis(out_p, 1, 0), pair_q, num_segments=nq)
    # Double `where`: dividing by (or taking the log of) 0 on empty rows would put NaN in grads.
    nonempty = denom > 0
    safe = jnp.where(nonempty, denom, 1.0)
    out = out / safe[..., None]
    out_bshd = jnp.einsum("IBGNQD->BIQGND", out).reshape(batch, s_pad, num_heads, -1)
    out_bshd = out_bshd[:, :s_len].astype(q.dtype)
    lse = jnp.where(nonempty, row_max + jnp.log(safe), -jnp.inf)
    lse_bhs = jnp.einsum("IBGNQ->BGNIQ", lse).reshape(batch, num_heads, s_pad)[:, :, :s_len]
    if explicit and s_len == t_len:
        ok_b = _plan_covers(q_positions, kv_positions, q_segment_ids, kv_segment_ids)
        out_bshd = jnp.where(ok_b[:, None, None, None], out_bshd, jnp.nan)
        lse_bhs = jnp.where(ok_b[:, None, None], lse_bhs, jnp.nan)
    return (out_bshd, lse_bhs) if return_lse else out_bshd


def _sink_keys(layout: masks.LozaLayout, q_pos, kv_pos, nq: int, block: int, sink_chunks: int,
               back: int, t_len: int):
    """Key indices and positions [B, nq * sink_chunks, bk] of each query block's document sink:
    `sink_blocks * block_size` keys from the start of the document holding the block's first
    query. Keys inside the block's local window (already visited) or past the sink get position
    -1, so no pair is counted twice."""
    batch = q_pos.shape[0]
    first_q = jnp.arange(nq, dtype=jnp.int32) * block  # [nq]
    doc_start = jnp.maximum(first_q[None, :] - q_pos[:, first_q], 0)  # [B, nq]
    offs = np.arange(sink_chunks * block, dtype=np.int32)  # [sink_chunks * bk]
    idx = doc_start[..., None] + offs  # [B, nq, sink_chunks * bk]
    local_start = np.maximum(np.arange(nq) - back, 0) * block  # first key the local pairs visit
    keep = ((offs < layout.sink_blocks * layout.block_size)[None, None, :]
            & (idx < local_start[None, :, None]) & (idx < t_len))
    idx = jnp.minimum(idx, t_len - 1)
    pos = jnp.take_along_axis(kv_pos, idx.reshape(batch, -1), axis=1).reshape(idx.shape)
    pos = jnp.where(keep, pos, -1)
    shape = (batch, nq * sink_chunks, block)
    return idx.reshape(shape), pos.reshape(shape)


def _plan_covers(q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    """Per batch row: are the positions global aranges or per-document aranges (see module
    docstring)? Only then does the explicit-position plan visit every allowed pair."""
    batch, s_len = q_positions.shape
    idx = jnp.broadcast_to(jnp.arange(s_len, dtype=jnp.int32), (batch, s_len))
    empty = kv_positions < 0
    global_ok = jnp.all((q_positions == idx) & ((kv_positions == idx) | empty), axis=1)
    if q_segment_ids is None:
        return global_ok
    doc = document_positions(q_segment_ids)
    # Each id must form one run: as many runs as distinct ids.
    runs = 1 + jnp.sum(q_segment_ids[:, 1:] != q_segment_ids[:, :-1], axis=1)
    ids = jnp.sort(q_segment_ids, axis=1)
    distinct = 1 + jnp.sum(ids[:, 1:] != ids[:, :-1], axis=1)
    doc_ok = (runs == distinct) & jnp.all(
        (q_segment_ids == kv_segment_ids) & (q_positions == doc) & ((kv_positions == doc) | empty),
        axis=1)
    return global_ok | doc_ok


def _shape(x) -> str:
    return "None" if x is None else str(tuple(x.shape))
