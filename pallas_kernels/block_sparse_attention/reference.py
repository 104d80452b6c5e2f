"""Plain-jnp block-sparse attention: the definition every backend must match ("xla")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.block_sparse_attention.masks import Layout

# float32 einsums at full precision: on GPU/TPU the default would round through bf16/tf32.
_HIGHEST = jax.lax.Precision.HIGHEST


def dense_mask(
    layout: Layout,
    q_positions: Int[Array, "B S"],
    kv_positions: Int[Array, "B T"],
    q_segment_ids: Int[Array, "B S"] | None = None,
    kv_segment_ids: Int[Array, "B T"] | None = None,
) -> Bool[Array, "B S T"]:
    """The element mask: layout on absolute positions, no empty slot (kv position < 0), and the
    same segment when segment ids are given. O(B*S*T) memory."""
    mask_bst = layout.allowed(q_positions[:, :, None], kv_positions[:, None, :])
    mask_bst &= kv_positions[:, None, :] >= 0  # also enforced by Layout.allowed; cheap to restate
    if q_segment_ids is not None:
        mask_bst &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return mask_bst


def attention_reference(
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
) -> Float[Array, "B S H Dv"] | tuple[Float[Array, "B S H Dv"], Float[Array, "B H S"]]:
    """softmax(scale * q k^T + mask) v with grouped kv heads, materialising the [B,H,S,T] scores.

    Query head h reads kv head h // (H // G) (GQA; G=1 is MQA, e.g. absorbed MLA decode with
    Dk=576, Dv=512). Positions default to arange; the mask is `dense_mask(...)`. Scores, softmax
    and log-sum-exp are float32 whatever the input dtype; the output is cast to q.dtype. A query
    with no allowed key gets output 0, lse -inf, and zero (finite) gradients.

    Returns:
      out [B, S, H, Dv] in q.dtype, and lse [B, H, S] float32 (natural log) if `return_lse`.
    """
    batch, s_len, num_heads, d_k = q.shape
    t_len, num_groups = k.shape[1], k.shape[2]
    n_rep = num_heads // num_groups  # query heads per kv head ("N" below)
    scale = d_k**-0.5 if scale is None else scale
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(s_len, dtype=jnp.int32), (batch, s_len))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(t_len, dtype=jnp.int32), (batch, t_len))
    mask_bst = dense_mask(layout, q_positions, kv_positions, q_segment_ids, kv_segment_ids)

    # Softmax statistics in float32: bf16 exp/sum loses ~3 significant digits at long T.
    acc = jnp.promote_types(q.dtype, jnp.float32)  # float64 inputs stay float64
    q_bsgnd = q.astype(acc).reshape(batch, s_len, num_groups, n_rep, d_k)
    scores_bgnst = jnp.einsum("BSGND,BTGD->BGNST", q_bsgnd, k.astype(acc),
                              precision=_HIGHEST) * scale
    mask_b11st = mask_bst[:, None, None]
    scores_bgnst = jnp.where(mask_b11st, scores_bgnst, -jnp.inf)
    # The max only stabilises exp; the result does not depend on it, so no gradient flows there.
    max_bgns = jax.lax.stop_gradient(jnp.max(scores_bgnst, axis=-1))
    max_bgns = jnp.where(jnp.isfinite(max_bgns), max_bgns, 0.0)  # empty rows: exp(-inf - 0) = 0
    probs_bgnst = jnp.exp(scores_bgnst - max_bgns[..., None])
    denom_bgns = jnp.sum(probs_bgnst, axis=-1)
    nonempty_bgns = denom_bgns > 0
    # Double `where`: dividing by (or taking the log of) 0 on empty rows would put NaN in grads.
    safe_denom_bgns = jnp.where(nonempty_bgns, denom_bgns, 1.0)
    out_bgnsd = jnp.einsum("BGNST,BTGD->BGNSD", probs_bgnst, v.astype(acc),
                           precision=_HIGHEST) / safe_denom_bgns[..., None]
    out_bshd = jnp.einsum("BGNSD->BSGND", out_bgnsd).reshape(batch, s_len, num_heads, -1)
    out_bshd = out_bshd.astype(q.dtype)
    if not return_lse:
        return out_bshd
    lse_bgns = jnp.where(nonempty_bgns, max_bgns + jnp.log(safe_denom_bgns), -jnp.inf)
    return out_bshd, lse_bgns.reshape(batch, num_heads, s_len)
