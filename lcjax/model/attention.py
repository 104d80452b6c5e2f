"""Multi-head latent attention (MLA) with LongCat's LoRA scales; full or LoZA sparse layout.

Train/prefill expands the latent into per-head keys and values. Cached decode uses the absorbed
form: queries are mapped into the latent space through kv_b's key half, attention runs as
multi-query attention over the latent cache (keys C+R dims, values C dims), and kv_b's value
half maps the result back to heads. Both are the same function of the inputs.

Quantized params (lcjax.quant): q_a, q_b, kv_a and o run quantized matmuls. kv_b is stored
quantized but always used dequantized (weight-only), in both forms: the absorbed decode splits
it into its key and value halves and contracts them with queries and attention outputs, not
with kv_b's own input, so no activation quantization of the latent could be shared by both
forms; dequantizing keeps decode equal to the full forward.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from lcjax.config import ModelConfig
from lcjax.model.layers import O_PROJ, RMSNorm, declare, dtype_of, linear
from lcjax.model.rope import apply_rope
from lcjax.ops import attention as attention_op
from lcjax.ops import activation_sparsity, observe
from lcjax.ops.quantized_matmul import weight_as

SparseFlag = Union[bool, Bool[Array, ""]]

class MLA(nn.Module):
    """One attention sublayer: q/kv LoRA projections, decoupled RoPE, MLA scales, o_proj."""

    config: ModelConfig

    def setup(self):
        cfg, a = self.config, self.config.mla
        m, h, pdt = cfg.hidden_size, a.num_heads, cfg.param_dtype
        c, r = a.kv_lora_rank, a.qk_rope_head_dim
        self.q_a = declare(self, "q_a", (m, a.q_lora_rank), ("embed", "q_lora"), pdt)  # [M, Q]
        self.q_a_norm = RMSNorm(a.latent_norm_eps, "q_lora", pdt)
        self.q_b = declare(self, "q_b", (a.q_lora_rank, h, a.qk_head_dim),
                           ("q_lora", "heads", "head_dim"), pdt)  # [Q, H, Dn+R]
        self.kv_a = declare(self, "kv_a", (m, c + r), ("embed", "kv_lora"), pdt)  # [M, C+R]
        self.kv_a_norm = RMSNorm(a.latent_norm_eps, "kv_lora", pdt)
        self.kv_b = declare(self, "kv_b", (c, h, a.qk_nope_head_dim + a.v_head_dim),
                            ("kv_lora", "heads", "head_dim"), pdt)  # [C, H, Dn+Dv]
        self.o = declare(self, "o", (h, a.v_head_dim, m), ("heads", "head_dim", "embed"), pdt)

    def _project(self, x: Float[Array, "B S M"], positions: Int[Array, "B S"]):
        """q_nope [B,S,H,Dn], roped q_rope [B,S,H,R], scaled latent [B,S,C], roped k_rope [B,S,R]."""
        cfg, a = self.config, self.config.mla
        cdt = dtype_of(cfg.dtype)
        x = x.astype(cdt)
        # Activation sparsity ("CHESS+"): the q path's input only; kv_a (the cache) stays dense.
        activation_sparsity.record(self, "q_a", x)
        x_q = activation_sparsity.threshold(self, "q_a", x)
        q_lat = self.q_a_norm(linear(self, "q_a", "BSM,MQ->BSQ", x_q, self.q_a, cdt))
        q = linear(self, "q_b", "BSQ,QHD->BSHD", q_lat, self.q_b, cdt)
        if a.scale_q_lora:
            q = q * math.sqrt(cfg.hidden_size / a.q_lora_rank)
        q_nope, q_rope = jnp.split(q, [a.qk_nope_head_dim], axis=-1)
        ckv = linear(self, "kv_a", "BSM,MC->BSC", x, self.kv_a, cdt)
        latent, k_rope = jnp.split(ckv, [a.kv_lora_rank], axis=-1)
        latent = self.kv_a_norm(latent)
        if a.scale_kv_lora:
            latent = latent * math.sqrt(cfg.hidden_size / a.kv_lora_rank)
        q_rope = apply_rope(q_rope, positions, a.rope)
        k_rope = apply_rope(k_rope[:, :, None, :], positions, a.rope)[:, :, 0, :]
        return q_nope, q_rope, latent, k_rope

    def _attend(self, q, k, v, sparse: SparseFlag, segment_ids):
        """Attention of the sequence over itself with the layer's layout, on in-sequence
        positions (per document when packed); a traced flag (scanned layers) picks by lax.cond."""
        cfg = self.config

        def run(is_sparse: bool):
            layout = attention_op.layout_for(is_sparse, cfg.loza)
            pos = attention_op.sequence_positions(layout, segment_ids)
            return attention_op.attention(q, k, v, layout=layout, scale=cfg.mla.softmax_scale,
                                          q_positions=pos, kv_positions=pos,
                                          q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                          implementation=cfg.attention_impl)

        if isinstance(sparse, bool):
            return run(sparse)
        return jax.lax.cond(sparse, lambda: run(True), lambda: run(False))

    def __call__(self, x: Float[Array, "B S M"], positions: Int[Array, "B S"],
                 segment_ids: Optional[Int[Array, "B S"]], sparse: SparseFlag):
        """Train/prefill attention over the sequence itself; also returns (latent, k_rope) to cache."""
        a = self.config.mla
        cdt = dtype_of(self.config.dtype)
        q_nope, q_rope, latent, k_rope = self._project(x, positions)
        observe.record(self, "kv_b", latent)  # calibration only (clip search of the weight)
        kv = jnp.einsum("BTC,CHD->BTHD", latent, weight_as(self.kv_b, cdt))
        k_nope, v = jnp.split(kv, [a.qk_nope_head_dim], axis=-1)
        b, t, h, _ = k_nope.shape
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], (b, t, h, k_rope.shape[-1]))], -1)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        out = self._attend(q, k, v, sparse, segment_ids)  # RoPE used `positions`
        y = linear(self, "o", "BSHD,HDM->BSM", self._sparse_o_input(out), self.o, cdt, O_PROJ)
        return y, (latent, k_rope)

    def decode(self, x: Float[Array, "B S M"], positions: Int[Array, "B S"], cache,
               sparse: bool, valid: Optional[Bool[Array, "B S"]] = None):
        """Append S new tokens to the latent cache and attend over it in the absorbed form.

        `cache` is any latent cache with `update_and_attend` (the contiguous `LayerCache`, or the
        serve engine's paged cache); `valid` marks real tokens of a right-padded chunk.
        Returns (y [B, S, M], updated cache).
        """
        cfg, a = self.config, self.config.mla
        cdt = dtype_of(cfg.dtype)
        q_nope, q_rope, latent, k_rope = self._project(x, positions)
        if valid is None:
            valid = jnp.ones(positions.shape, bool)
        kv_b = weight_as(self.kv_b, cdt)
        w_uk, w_uv = kv_b[..., : a.qk_nope_head_dim], kv_b[..., a.qk_nope_head_dim:]
        q_lat = jnp.einsum("BSHD,CHD->BSHC", q_nope, w_uk)
        q_abs = jnp.concatenate([q_lat, q_rope], axis=-1)  # [B, S, H, C+R]
        layout = attention_op.layout_for(sparse, cfg.loza)

        def attend(q, k, v, **kwargs):
            return attention_op.attention(q, k, v, layout=layout, scale=a.softmax_scale,
                                          implementation=cfg.attention_impl, **kwargs)

        o_lat, cache = cache.update_and_attend(q_abs, latent.astype(cdt), k_rope.astype(cdt),
                                               positions, valid, sparse=sparse, loza=cfg.loza,
                                               attend=attend, scale=a.softmax_scale)
        out = jnp.einsum("BSHC,CHD->BSHD", o_lat, w_uv)
        return linear(self, "o", "BSHD,HDM->BSM", self._sparse_o_input(out), self.o, cdt,
                      O_PROJ), cache

    def _sparse_o_input(self, out: Float[Array, "B S H D"]) -> Float[Array, "B S H D"]:
        """The o_proj input, thresholded when the layer has "o" thresholds ("CHESS+")."""
        activation_sparsity.record(self, "o", out, kdims=2)
        return activation_sparsity.threshold(self, "o", out)
