"""Sparse verification over A²ATS key retrieval: one retrieved key set shared by the draft tokens.

With A²ATS retrieval on (lcjax/sparsity/a2ats.py, a2ats_cache.RetrievalPagedCache) every decode
step already attends only retrieved keys; a verify step of k+1 tokens would retrieve for each of
its tokens and attend the union. Sparse verification (lcjax/sparsity/sparse_verify.py) instead
lets one verify token choose for all of them and for adjacent sublayers. Together, in each
full-attention sublayer of the verify pass:

  1. the `score_query` verify token (default x_n) scores every cached key from its VQ code and
     keeps A²ATS's set for itself: sinks + local window + the union over heads of each head's
     top ceil(topk_fraction * (p + 1)) keys (capped by max_gather_fraction if set);
  2. the verify tokens' own positions join that set (they are the draft's causal context);
  3. every verify token attends exactly to the set's gathered rows, causally (a key at or
     before the token's position);
  4. the next `reuse_layers - 1` full-attention sublayers reuse the set (the positions; each
     gathers its own rows), so retrieval scoring runs once per reuse group. The first
     `dense_first` full sublayers attend to every cached key.

The Quest page settings (block_budget, sink_blocks, local_blocks, head_reduce) do not apply:
A²ATS's topk_fraction, max_gather_fraction, sink_tokens and local_window size the set, and no
page key bounds are kept (so host-offloaded pages need nothing extra on the device). The MoE
rule and the verify-only CHESS thresholds apply unchanged. With topk_fraction = 1 every key is
kept and verification is exact.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from lcjax.sparsity.sparse_verify import SparseVerifyConfig

# SparseVerifyConfig fields that size Quest page selection and so do nothing under A²ATS.
PAGE_ONLY_KEYS = ("block_budget", "sink_blocks", "local_blocks", "head_reduce")


class RetrievalSelector:
    """The key positions of one verify pass, handed from the sublayer that retrieves to its
    reusers (RetrievalPagedCache.share). Called in layer order while the verify step is traced:
    call k is the k-th full-attention sublayer (see the module docstring for the schedule)."""

    def __init__(self, cfg: SparseVerifyConfig):
        self.cfg = cfg
        self.calls = 0
        self.chosen: Optional[Array] = None
        self.scored: list[int] = []  # calls that retrieved (the others attended densely / reused)
        self.sizes: list[Array] = []  # per retrieving call: [B] keys in the shared set (traced)

    def __call__(self, cache: Any, q_abs: Float[Array, "B S H D"], positions: Int[Array, "B S"],
                 kv_positions: Int[Array, "B T"]) -> Int[Array, "B N"]:
        """Positions every verify token attends (ascending, -1 = unused buffer entry)."""
        cfg, call = self.cfg, self.calls
        self.calls += 1
        if call < cfg.dense_first:
            return kv_positions
        if (call - cfg.dense_first) % cfg.reuse_layers == 0 or self.chosen is None:
            i = min(cfg.score_query, q_abs.shape[1] - 1)
            own = jnp.any(kv_positions[:, None, :] == positions[:, :, None], axis=1)
            own = own & (kv_positions >= 0)  # [B, T]: the verify tokens' positions
            self.chosen = cache.select(q_abs[:, i:i + 1], positions[:, i:i + 1], kv_positions,
                                       extra=own, num_extra=q_abs.shape[1])
            self.scored.append(call)
            self.sizes.append(jnp.sum(self.chosen >= 0, axis=1))
        return self.chosen
