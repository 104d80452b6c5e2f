"""Cached inference: `prefill` a right-padded batch, then `decode_step` S new tokens at a time.

Pure functions of (config, variables, cache, tokens). Prefill runs the scanned training forward
once and files each sublayer's latent into its cache; decode unrolls the layers (a few tokens per
step, so compile time is small) and attends over the latent cache in MLA's absorbed form.
`forward_hidden` is that cached stack, shared with the serve engine (which passes its paged and
ring caches as the per-sublayer caches); `mtp_features` is the MTP block's cached step.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from lcjax.config import Config, ModelConfig
from lcjax.model.cache import ModelCache, cache_capacity, init_layer_cache, write_layer_cache
from lcjax.model.decoder import DecoderLayer, MTPBlock
from lcjax.model.embedding import Embedder, ngram_history
from lcjax.model.layers import LORA_COLLECTION, RMSNorm, dtype_of
from lcjax.model.model import LongCatModel, model_config, project_logits, validate_token_ids
from lcjax.model.moe import BIAS_COLLECTION
from lcjax.ops import activation_sparsity


def layer_variables(variables: dict, layer: int, cfg: ModelConfig) -> dict:
    """The params, router bias (and activation thresholds and LoRA adapters, when given) of one
    logical layer, from a scanned or unrolled tree."""
    out = {}
    name = "layers" if cfg.scan_layers else f"layers_{layer}"
    for col in ("params", BIAS_COLLECTION, activation_sparsity.COLLECTION, LORA_COLLECTION):
        optional = col in (activation_sparsity.COLLECTION, LORA_COLLECTION)
        if optional and name not in variables.get(col, {}):  # e.g. adapters on the MTP head only
            continue
        tree = variables[col]
        out[col] = jax.tree.map(lambda a: a[layer], tree[name]) if cfg.scan_layers else tree[name]
    return out


def sparse_pair(cfg: ModelConfig, layer: int) -> tuple[bool, bool]:
    """Whether attention sublayers 2*layer and 2*layer+1 are LoZA sparse."""
    return tuple(cfg.sparse_layers[2 * layer: 2 * layer + 2])


def forward_hidden(cfg: ModelConfig, variables: Any, tokens: Int[Array, "B S"],
                   positions: Int[Array, "B S"], layer_caches: Sequence[Any],
                   valid: Optional[Bool[Array, "B S"]] = None,
                   history: Optional[Int[Array, "B N"]] = None
                   ) -> tuple[Float[Array, "B S M"], tuple]:
    """The cached forward of S new tokens: embedding -> every layer's decode -> final norm.

    `layer_caches` holds one latent cache per attention sublayer, anything with
    `update_and_attend` (the contiguous LayerCache here, the serve engine's paged pools and ring
    rows there), so every cached path runs this one stack. `valid` marks real tokens of a
    right-padded chunk (None: all); `history` is the n-gram context before tokens[:, 0].
    `variables` must be unboxed. Returns (final-normed hidden [B, S, M], updated caches).
    """
    params = variables["params"]
    x = Embedder(cfg).apply({"params": params["embed"]}, tokens, None, history)
    caches = list(layer_caches)
    for layer in range(cfg.num_layers):
        x, new = DecoderLayer(cfg).apply(layer_variables(variables, layer, cfg), x,
                                         sparse_pair(cfg, layer), positions,
                                         tuple(caches[2 * layer: 2 * layer + 2]), valid,
                                         method=DecoderLayer.decode)
        caches[2 * layer: 2 * layer + 2] = new
    hidden = RMSNorm(cfg.rms_norm_eps).apply({"params": params["final_norm"]}, x)
    return hidden, tuple(caches)


def mtp_features(cfg: ModelConfig, variables: Any, hidden: Float[Array, "B S M"],
                 next_ids: Int[Array, "B S"], positions: Int[Array, "B S"], cache: Any,
                 valid: Optional[Bool[Array, "B S"]] = None) -> tuple[Float[Array, "B S M"], Any]:
    """The MTP block over a latent cache (cached drafting): (features predicting token t+2,
    updated cache). `project_logits` turns the features into draft logits."""
    mtp_vars = {col: variables[col]["mtp"]
                for col in ("params", activation_sparsity.COLLECTION, LORA_COLLECTION)
                if "mtp" in variables.get(col, {})}
    return MTPBlock(cfg).apply(mtp_vars, hidden, next_ids, positions, None, cache, valid)


def init_cache(config: Union[Config, ModelConfig], batch: int, max_len: int) -> ModelCache:
    """Empty cache for `batch` rows of up to `max_len` tokens (sparse sublayers: window slots)."""
    cfg = model_config(config)
    if not 0 < max_len <= cfg.max_position_embeddings:
        raise ValueError(f"max_len={max_len} must be in [1, max_position_embeddings="
                         f"{cfg.max_position_embeddings}]")
    dtype = dtype_of(cfg.dtype)
    layers = tuple(
        init_layer_cache(batch, cache_capacity(sparse, max_len, cfg.loza), cfg.mla.kv_lora_rank,
                         cfg.mla.qk_rope_head_dim, dtype)
        for sparse in cfg.sparse_layers)
    hist = cfg.ngram.neighbor_num - 1 if cfg.ngram.enabled else 0
    return ModelCache(layers=layers, lengths=jnp.zeros((batch,), jnp.int32),
                      ngram_history=jnp.zeros((batch, hist), jnp.int32))


def prefill(config: Union[Config, ModelConfig], variables: Any, input_ids: Array, lengths: Array,
            max_len: int) -> tuple[Float[Array, "B S V"], ModelCache]:
    """Forward a right-padded prompt batch (row b valid for its first lengths[b] tokens).

    input_ids [B, S] int and lengths [B] int are user input, so they are validated here (a
    ValueError naming the value) rather than by a type annotation.
    """
    cfg = model_config(config)
    validate_token_ids(input_ids, cfg)
    b, s = input_ids.shape
    if s > max_len:
        raise ValueError(f"prompt length {s} exceeds the cache max_len={max_len}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must have shape ({b},), got {tuple(lengths.shape)}")
    variables = nn.unbox(variables)
    logits, aux = LongCatModel(cfg).apply(variables, input_ids, return_aux=True, return_kv=True)
    cache = init_cache(cfg, b, max_len)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    valid = positions < lengths[:, None]
    layers = list(cache.layers)
    for idx, sparse in enumerate(cfg.sparse_layers):
        layer, sub = divmod(idx, 2)
        latent, k_rope = (t[layer] for t in aux.latents[sub])
        layers[idx] = write_layer_cache(layers[idx], latent, k_rope, positions, valid, sparse, cfg.loza)
    history = cache.ngram_history
    if cfg.ngram.enabled:
        history = ngram_history(input_ids, lengths, cfg)
    return logits, ModelCache(layers=tuple(layers), lengths=lengths.astype(jnp.int32),
                              ngram_history=history)


def decode_step(config: Union[Config, ModelConfig], variables: Any, cache: ModelCache,
                tokens: Array) -> tuple[Float[Array, "B S V"], ModelCache]:  # tokens [B, S] int
    """Consume S new tokens per row at positions lengths[b]..; returns their logits and the cache.

    S is free even with LoZA sparse layers: each chunk attends over [ring, its own tokens]
    before the ring is updated, so a chunk longer than the ring loses no key.
    """
    cfg = model_config(config)
    validate_token_ids(tokens, cfg, "tokens")
    variables = nn.unbox(variables)
    b, s = tokens.shape
    positions = cache.lengths[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
    history = cache.ngram_history if cfg.ngram.enabled else None
    hidden, layers = forward_hidden(cfg, variables, tokens, positions, cache.layers,
                                    history=history)
    logits = project_logits(cfg, hidden, variables["params"]["lm_head"])
    new_history = cache.ngram_history
    if cfg.ngram.enabled:
        new_history = ngram_history(tokens, jnp.full((b,), s, jnp.int32), cfg, history)
    return logits, ModelCache(layers=layers, lengths=cache.lengths + s,
                              ngram_history=new_history)
