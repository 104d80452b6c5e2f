"""A²ATS calibration: run a few prompts, collect each full sublayer's WRoPE queries and pre-RoPE
keys, and build one query-aware codebook per sublayer (`calibrate` -> `A2ATSIndex`).

The index (codebooks + settings) is what the serve engine takes (`Engine(..., kv_retrieval=...)`,
`python -m lcjax.serve --kv-retrieval a2ats`), and what `evaluate` runs teacher-forced.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from lcjax.config import ModelConfig, RopeConfig
from lcjax.model.cache import init_layer_cache
from lcjax.model.decode import forward_hidden
from lcjax.model.layers import dtype_of
from lcjax.model.model import project_logits
from lcjax.sparsity.a2ats import (A2ATSConfig, Codebook, attention_mass_recall, build_codebook,
                                  prerope_keys, wrope_queries)
from lcjax.sparsity.a2ats_cache import RecordingCache, RetrievalDenseCache, attach


@flax.struct.dataclass
class A2ATSIndex:
    """Codebooks of every attention sublayer (None for LoZA sparse ones) and the settings."""

    books: tuple
    rope: RopeConfig = flax.struct.field(pytree_node=False)
    config: A2ATSConfig = flax.struct.field(pytree_node=False)

    def with_config(self, **changes) -> "A2ATSIndex":
        """The same codebooks with other retrieval settings (top-k, window, offload, ...)."""
        return self.replace(config=dataclasses.replace(self.config, **changes))

    def attach(self, cache: Any, num_pages: int, page_size: int) -> Any:
        """The serve engine's cache with this index's retrieval state (see a2ats_cache.attach)."""
        return attach(self, cache, num_pages, page_size)

    def save(self, path: str) -> None:
        arrays = {f"{i}.{f}": np.asarray(getattr(b, f)) for i, b in enumerate(self.books)
                  if b is not None for f in ("centroids", "centroids_l", "transform")}
        meta = dict(num_layers=len(self.books), config=dataclasses.asdict(self.config))
        np.savez(path, __meta__=np.asarray(json.dumps(meta)), **arrays)


def load_index(path: str, cfg: ModelConfig, **overrides) -> A2ATSIndex:
    """An index saved by `A2ATSIndex.save` (settings overridable, e.g. topk_fraction)."""
    data = np.load(path)
    meta = json.loads(str(data["__meta__"]))
    if meta["num_layers"] != len(cfg.sparse_layers):
        raise ValueError(f"codebook file {path} has {meta['num_layers']} sublayers, the model "
                         f"{len(cfg.sparse_layers)}")
    books = tuple(Codebook(*(jnp.asarray(data[f"{i}.{f}"])
                             for f in ("centroids", "centroids_l", "transform")))
                  if f"{i}.centroids" in data else None for i in range(meta["num_layers"]))
    a2 = A2ATSConfig(**{**meta["config"], **overrides})
    return A2ATSIndex(books=books, rope=cfg.mla.rope, config=a2)


def full_layer_caches(cfg: ModelConfig, batch: int, length: int, wrap) -> tuple:
    """Fresh contiguous caches for a `length`-token forward: `wrap(i, LayerCache)` for full
    sublayers, plain LayerCache (a ring that holds the whole chunk) for sparse ones."""
    dtype = dtype_of(cfg.dtype)
    out = []
    for i, sparse in enumerate(cfg.sparse_layers):
        cache = init_layer_cache(batch, length, cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim,
                                 dtype)
        out.append(cache if sparse else wrap(i, cache))
    return tuple(out)


@functools.partial(jax.jit, static_argnums=0)
def _forward_caches(cfg: ModelConfig, variables: Any, tokens: Int[Array, "B S"], caches: tuple):
    """forward_hidden of a whole sequence from empty caches (positions 0.., no n-gram history);
    jitted once per model, shape and cache kind."""
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    history = jnp.zeros((b, cfg.ngram.neighbor_num - 1), jnp.int32) if cfg.ngram.enabled else None
    return forward_hidden(cfg, variables, tokens, positions, caches, history=history)


def collect(cfg: ModelConfig, variables: Any, tokens: Int[Array, "B S"], a2: A2ATSConfig
            ) -> dict[int, tuple[Float[Array, "N D"], Float[Array, "M D"]]]:
    """{full sublayer: (pre-RoPE keys [B*S, D], WRoPE queries of all heads [B*S*H, D])}."""
    variables = nn.unbox(variables)
    b, s = tokens.shape
    caches = full_layer_caches(cfg, b, s, lambda i, c: RecordingCache(inner=c))
    out = {}
    r = cfg.mla.qk_rope_head_dim
    for i, rec in enumerate(_forward_caches(cfg, variables, tokens, caches)[1]):
        if isinstance(rec, RecordingCache):
            keys = prerope_keys(rec.keys.astype(jnp.float32), rec.positions, r, cfg.mla.rope)
            q = wrope_queries(rec.q_abs.astype(jnp.float32), rec.positions, r, cfg.mla.rope,
                              a2.wrope_position)
            out[i] = (keys.reshape(-1, keys.shape[-1]), q.reshape(-1, q.shape[-1]))
    return out


def calibrate(cfg: ModelConfig, variables: Any, prompts: Sequence[Int[Array, "B S"]],
              a2: A2ATSConfig = A2ATSConfig()) -> A2ATSIndex:
    """Codebooks from calibration prompt batches (each [B, S] tokens; seeded by a2.seed)."""
    if not prompts:
        raise ValueError("calibrate needs at least one prompt batch")
    parts: dict[int, list] = {}
    for batch in prompts:
        for i, kq in collect(cfg, variables, jnp.asarray(batch), a2).items():
            parts.setdefault(i, []).append(kq)
    key = jax.random.PRNGKey(a2.seed)
    books = []
    for i in range(len(cfg.sparse_layers)):
        if i not in parts:
            books.append(None)
            continue
        keys = jnp.concatenate([k for k, _ in parts[i]])
        queries = jnp.concatenate([q for _, q in parts[i]])
        books.append(build_codebook(keys, queries, a2, jax.random.fold_in(key, i)))
    return A2ATSIndex(books=tuple(books), rope=cfg.mla.rope, config=a2)


def evaluate(cfg: ModelConfig, variables: Any, tokens: Int[Array, "B S"],
             index: Optional[A2ATSIndex], oracle: bool = False) -> dict[str, Any]:
    """Teacher-forced next-token NLL of each position with every query attending its A²ATS
    selection (index None: exact), plus per full sublayer the attention-mass recall.

    `oracle` ranks keys by their exact scores instead (the ceiling of any top-k retrieval).
    Returns {"nll": [B, S-1], "recall": {sublayer: [B, S, H]}}.
    """
    variables = nn.unbox(variables)
    b, s = tokens.shape
    if index is None:
        wrap = lambda i, c: c  # noqa: E731
    else:
        wrap = lambda i, c: RetrievalDenseCache(  # noqa: E731
            inner=c, book=index.books[i], rope=index.rope, config=index.config, oracle=oracle)
    caches = full_layer_caches(cfg, b, s, wrap)
    nll, recall = _nll_and_recall(cfg, variables, jnp.asarray(tokens), caches)
    return {"nll": nll, "recall": recall}


@functools.partial(jax.jit, static_argnums=0)
def _nll_and_recall(cfg: ModelConfig, variables: Any, tokens: Int[Array, "B S"], caches: tuple):
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    hidden, new = _forward_caches(cfg, variables, tokens, caches)
    logits = project_logits(cfg, hidden, variables["params"]["lm_head"]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    recall = {i: attention_mass_recall(n.q_abs, n.keys, n.kv_positions, positions, n.mask,
                                       cfg.mla.softmax_scale)
              for i, n in enumerate(new) if isinstance(n, RetrievalDenseCache)}
    return nll, recall
