"""ScMoE logical layer (2 MLA + 2 dense SwiGLU + 1 shortcut MoE) and the MTP block.

Residual order is HF LongcatFlashDecoderLayer's exactly:
    x1 = x0 + MLA_0(norm_in0(x0));  n1 = norm_post0(x1);  m = MoE(n1)
    x2 = x1 + MLP_0(n1);  x3 = x2 + MLA_1(norm_in1(x2));  out = (x3 + MLP_1(norm_post1(x3))) + m
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from lcjax.config import ModelConfig
from lcjax.model.attention import MLA
from lcjax.model.embedding import TokenEmbedding
from lcjax.model.layers import RMSNorm, SwiGLU, declare
from lcjax.model.moe import MoE


class DecoderLayer(nn.Module):
    """One logical LongCat layer; attention sublayers 2l and 2l+1 (each full or LoZA sparse)."""

    config: ModelConfig
    # Static (full/sparse) pair when every logical layer has the same one; else the traced flags
    # passed to __call__ decide per layer under scan.
    static_sparse: Optional[tuple[bool, bool]] = None
    return_kv: bool = False  # also return each sublayer's (latent, k_rope) for cache filling

    def setup(self):
        cfg = self.config
        eps, pdt = cfg.rms_norm_eps, cfg.param_dtype
        self.input_norm = [RMSNorm(eps, "embed", pdt) for _ in range(2)]
        self.attn = [MLA(cfg) for _ in range(2)]
        self.post_norm = [RMSNorm(eps, "embed", pdt) for _ in range(2)]
        self.mlp = [SwiGLU(cfg.ffn_hidden_size, pdt, cfg.dtype) for _ in range(2)]
        self.moe = MoE(cfg)

    def _block(self, x: Float[Array, "B S M"], attend: Callable, token_mask):
        x1 = x + attend(0, self.input_norm[0](x))
        n1 = self.post_norm[0](x1)
        shortcut, stats = self.moe(n1, token_mask)
        x2 = x1 + self.mlp[0](n1)
        x3 = x2 + attend(1, self.input_norm[1](x2))
        out = (x3 + self.mlp[1](self.post_norm[1](x3))) + shortcut
        return nn.with_logical_constraint(out, ("batch", "length", "embed")), stats

    def __call__(self, x: Float[Array, "B S M"], sparse: Union[tuple[bool, bool], Bool[Array, "2"]],
                 positions: Int[Array, "B S"], segment_ids: Optional[Int[Array, "B S"]],
                 token_mask: Optional[Bool[Array, "B S"]]):
        """Returns (x_out, (RoutingStats, latents)); latents = ((latent, k_rope) per sublayer)."""
        latents = []
        sparse = self.static_sparse if self.static_sparse is not None else sparse

        def attend(i, h):
            y, kv = self.attn[i](h, positions, segment_ids, sparse[i])
            latents.append(kv)
            return y

        out, stats = self._block(x, attend, token_mask)
        return out, (stats, tuple(latents) if self.return_kv else None)

    def decode(self, x: Float[Array, "B S M"], sparse: tuple[bool, bool], positions: Int[Array, "B S"],
               caches: tuple, valid: Optional[Bool[Array, "B S"]] = None):
        """Cached step over S new tokens (valid marks real ones); returns (x_out, updated caches)."""
        new_caches = []

        def attend(i, h):
            y, cache = self.attn[i].decode(h, positions, caches[i], sparse[i], valid)
            new_caches.append(cache)
            return y

        out, _ = self._block(x, attend, valid)
        return out, tuple(new_caches)


class MTPBlock(nn.Module):
    """Multi-token prediction: hidden h_t and embedding of token t+1 -> features to predict t+2.

    z = eh_proj([enorm(Embed(x_{t+1})); hnorm(h_t)]) -> dense pre-norm layer (MLA + SwiGLU)
    -> final norm; the caller applies the shared lm_head (model.project_logits). The embedding
    is the MTP's own table.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: Float[Array, "B S M"], next_ids: Int[Array, "B S"],
                 positions: Int[Array, "B S"], segment_ids: Optional[Int[Array, "B S"]],
                 cache=None, valid: Optional[Bool[Array, "B S"]] = None):
        """Features [B, S, M] predicting token t+2; with a latent `cache` (cached drafting) the
        attention runs over it and (features, updated cache) is returned."""
        cfg = self.config
        eps, pdt, m = cfg.rms_norm_eps, cfg.param_dtype, cfg.hidden_size
        next_embeds = TokenEmbedding(cfg, name="embed")(next_ids)
        e = RMSNorm(eps, "embed", pdt, name="enorm")(next_embeds)
        h = RMSNorm(eps, "embed", pdt, name="hnorm")(hidden)
        eh_proj = declare(self, "eh_proj", (2 * m, m), ("mlp", "embed"), pdt)  # [2M, M]
        z = jnp.einsum("BSN,NM->BSM", jnp.concatenate([e, h], axis=-1), eh_proj.astype(e.dtype))
        attn = MLA(cfg, name="attn")
        normed = RMSNorm(eps, "embed", pdt, name="input_norm")(z)
        if cache is None:
            a, _ = attn(normed, positions, segment_ids, False)
        else:
            a, cache = attn.decode(normed, positions, cache, False, valid)
        z = z + a
        z = z + SwiGLU(cfg.mtp_ffn, pdt, cfg.dtype, name="mlp")(
            RMSNorm(eps, "embed", pdt, name="post_norm")(z))
        out = RMSNorm(eps, "embed", pdt, name="final_norm")(z)
        return out if cache is None else (out, cache)
