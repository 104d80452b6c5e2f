"""LongCatModel: embed -> scanned ScMoE layers -> final norm -> lm_head (+ MTP head)."""

from __future__ import annotations

from typing import Any, Optional, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lcjax.config import Config, ModelConfig
from lcjax.model.decoder import DecoderLayer, MTPBlock
from lcjax.model.embedding import Embedder
from lcjax.model.layers import (LORA_COLLECTION, LORA_DROPOUT_RNG, RMSNorm, acc_dtype, declare,
                                dtype_of, weight_einsum)
from lcjax.model.moe import BIAS_COLLECTION, RoutingStats
from lcjax.ops import activation_sparsity, observe
from lcjax.ops.attention import document_positions

_REMAT = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class ModelAux:
    """Everything besides the logits that training and serving read from a forward pass."""

    routing: RoutingStats  # stacked per logical layer: tokens_per_expert [L, E+Z], zero_share [L]
    hidden: Any  # [B, S, M]: final-normed hidden state (MTP input)
    mtp_logits: Any  # [B, S, V] or None: predicts token t+2 at position t
    latents: Optional[tuple]  # per logical layer stacked ((latent [L,B,S,C], k_rope [L,B,S,R]) x 2)


def model_config(config: Union[Config, ModelConfig]) -> ModelConfig:
    """Accept the whole run Config or its model part."""
    return config.model if isinstance(config, Config) else config


def validate_token_ids(input_ids, cfg: ModelConfig, name: str = "input_ids") -> None:
    """Static checks on token ids: integer dtype, rank 2, length within the configured maximum."""
    dtype = getattr(input_ids, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {dtype}")
    if input_ids.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"{name} sequence length {input_ids.shape[1]} exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings}")


def project_logits(cfg: ModelConfig, hidden: Float[Array, "B S M"],
                   lm_head: Float[Array, "M V"]) -> Float[Array, "B S V"]:
    """The lm_head: logits of final-normed hidden states (or MTP features) in the compute dtype,
    returned in float32 (or wider) for a stable softmax / loss. Every logit in the package,
    training, cached decode, serving and MTP drafts, comes from here."""
    cdt = dtype_of(cfg.dtype)
    return weight_einsum("BSM,MV->BSV", hidden.astype(cdt), lm_head.astype(cdt)).astype(acc_dtype(cdt))


class LongCatModel(nn.Module):
    """The LongCat-Flash family language model (Flash, Flash-Lite n-gram, LoZA ZigZag).

    `apply(variables, input_ids)` returns float32 logits [B, S, V]. `variables` holds `params`
    and the non-trainable `router_bias` collection. `segment_ids` (0 = padding) packs several
    documents per row; positions then restart per document unless given.
    """

    config: Union[Config, ModelConfig]

    @property
    def cfg(self) -> ModelConfig:
        return model_config(self.config)

    def _layers(self, x, positions, segment_ids, token_mask, return_kv: bool):
        cfg = self.cfg
        pairs = [tuple(cfg.sparse_layers[2 * l: 2 * l + 2]) for l in range(cfg.num_layers)]
        static = pairs[0] if len(set(pairs)) == 1 else None
        layer = DecoderLayer
        if cfg.remat_policy != "none":
            layer = nn.remat(DecoderLayer, policy=_REMAT[cfg.remat_policy],
                             prevent_cse=not cfg.scan_layers, static_argnums=(2,))
        if cfg.scan_layers:
            flags = jnp.asarray(np.array(pairs, dtype=bool))  # [L, 2]
            # Calibration (lcjax.ops.observe) sows per-layer input statistics: stacked like params.
            # LoRA adapters (layers.LORA_COLLECTION) are stacked too; adapter dropout differs per layer.
            axes = {"params": 0, BIAS_COLLECTION: 0, LORA_COLLECTION: 0,
                    **{c: 0 for c in observe.COLLECTIONS + activation_sparsity.COLLECTIONS}}
            scanned = nn.scan(layer, variable_axes=axes,
                              split_rngs={"params": True, LORA_DROPOUT_RNG: True},
                              in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                              length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            return scanned(cfg, static, return_kv, name="layers")(
                x, flags, positions, segment_ids, token_mask)
        outs = []
        for l in range(cfg.num_layers):
            x, out = layer(cfg, pairs[l], return_kv, name=f"layers_{l}")(
                x, pairs[l], positions, segment_ids, token_mask)
            outs.append(out)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    @nn.compact
    def __call__(self, input_ids: Array, segment_ids: Optional[Int[Array, "B S"]] = None,
                 positions: Optional[Int[Array, "B S"]] = None, *, return_aux: bool = False,
                 return_kv: bool = False):
        cfg = self.cfg
        validate_token_ids(input_ids, cfg)  # [B, S] int; checked here so bad input is a ValueError
        if segment_ids is not None and segment_ids.shape != input_ids.shape:
            raise ValueError(f"segment_ids shape {segment_ids.shape} != input_ids shape {input_ids.shape}")
        b, s = input_ids.shape
        if positions is None:
            positions = (jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
                         if segment_ids is None else document_positions(segment_ids))
        token_mask = None if segment_ids is None else segment_ids != 0

        x = Embedder(cfg, name="embed")(input_ids, segment_ids)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x, (routing, latents) = self._layers(x, positions, segment_ids, token_mask, return_kv)
        hidden = RMSNorm(cfg.rms_norm_eps, "embed", cfg.param_dtype, name="final_norm")(x)
        lm_head = declare(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                          cfg.param_dtype)  # [M, V]
        logits = project_logits(cfg, hidden, lm_head)
        if not (return_aux or self.is_initializing()):
            return logits
        mtp_logits = None
        if cfg.mtp_layers:
            next_ids = jnp.concatenate([input_ids[:, 1:], jnp.full((b, 1), cfg.pad_token_id,
                                                                   input_ids.dtype)], axis=1)
            mtp_logits = project_logits(
                cfg, MTPBlock(cfg, name="mtp")(hidden, next_ids, positions, segment_ids), lm_head)
        aux = ModelAux(routing=routing, hidden=hidden, mtp_logits=mtp_logits, latents=latents)
        return (logits, aux) if return_aux else logits
