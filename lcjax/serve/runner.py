"""The engine's jitted device functions: prefill chunks, decode steps, MTP speculative rounds.

Each is a pure function of (variables, EngineState, step inputs) -> (EngineState, outputs) with
static shapes: the host pads every step to a (batch, length) bucket, so a workload compiles each
function once per bucket it uses, never once per request. Sampling happens on device; only the
chosen tokens and their top-20 logprobs come back to the host.

Rows of a step are engine slots (`slots[b]`, -1 = padding). Per-slot state (sparse-layer rings,
n-gram history, penalty counts, MTP pending inputs) lives in EngineState arrays indexed by slot;
full-attention layers read and write pages through each row's block table.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from lcjax.config import ModelConfig
from lcjax.model.decode import forward_hidden, mtp_features
from lcjax.model.embedding import ngram_history
from lcjax.model.layers import dtype_of
from lcjax.model.model import project_logits
from lcjax.serve import sampling
from lcjax.serve.kv_cache import (PagedLayerCache, ServeCache, gather_rings, init_serve_cache,
                                  scatter_rings)
from lcjax.sparsity import sparse_verify as sv
from lcjax.sparsity.sparse_verify_retrieval import RetrievalSelector

DRAFT_SEED_SALT = 0x5BD1E995  # draft keys must be independent of the verify/sample keys


@flax.struct.dataclass
class EngineState:
    """Everything on device that outlives a step (fields `Any`, shapes in comments)."""

    cache: ServeCache
    counts: Any  # [slots, V] int32: generated-token counts (frequency/presence/repetition)
    prompt_mask: Any  # [slots, V] bool: tokens present in the prompt (repetition penalty)
    pending_hidden: Any  # [slots, K1, M]: main hidden states whose MTP entries are not written yet
    pending_tokens: Any  # [slots, K1] int32: the token following each pending position
    pending_count: Any  # [slots] int32
    pending_start: Any  # [slots] int32: position of pending_hidden[:, 0]


def init_engine_state(cfg: ModelConfig, num_slots: int, num_pages: int, page_size: int,
                      num_speculative: int, page_bounds: bool = False,
                      host_pools: bool = False) -> EngineState:
    """Empty state; `page_bounds` keeps per-page key bounds (sparse verification), `host_pools`
    builds the full sublayers' page pools in pinned host memory (A²ATS host offload)."""
    k1 = num_speculative + 1
    dtype = dtype_of(cfg.dtype)
    return EngineState(
        cache=init_serve_cache(cfg, num_slots, num_pages, page_size, bounds=page_bounds,
                               host_pools=host_pools),
        counts=jnp.zeros((num_slots, cfg.vocab_size), jnp.int32),
        prompt_mask=jnp.zeros((num_slots, cfg.vocab_size), bool),
        pending_hidden=jnp.zeros((num_slots, k1, cfg.hidden_size), dtype),
        pending_tokens=jnp.zeros((num_slots, k1), jnp.int32),
        pending_count=jnp.zeros((num_slots,), jnp.int32),
        pending_start=jnp.zeros((num_slots,), jnp.int32))


@flax.struct.dataclass
class StepInputs:
    """One padded step (host-built). Row b feeds tokens[b, :num_valid[b]] at positions starts[b].."""

    tokens: Any  # [B, S] int32
    slots: Any  # [B] int32, -1 = padding row
    starts: Any  # [B] int32: position of tokens[:, 0]
    num_valid: Any  # [B] int32
    block_tables: Any  # [B, N] int32 (padding rows: all page 0)
    reset: Any  # [B] bool: first chunk of a request (clear its slot's rings/history/counts)
    seeds: Any  # [B] uint32: per-request sampling seed
    gen_steps: Any  # [B] int32: tokens the request has generated so far (key index)
    sampling: Any  # sampling.SamplingTensors, rows [B]
    bias: Any  # [B, V] float32: additive logit bias of each row's next token (0 = none)
    num_draft: Any  # [B] int32: drafts a speculative round may accept per row (0 = plain decode)


def _rows(table: Array, slots: Int[Array, "B"]) -> Array:
    return table[jnp.clip(slots, 0, table.shape[0] - 1)]


def _put_rows(table: Array, slots: Int[Array, "B"], rows: Array) -> Array:
    return table.at[jnp.where(slots < 0, table.shape[0], slots)].set(rows, mode="drop")


def forward_step(cfg: ModelConfig, variables: Any, cache: ServeCache, inp: StepInputs, *,
                 all_valid: bool, implementation, select=None):
    """Main model over the step's tokens: (final-normed hidden [B, S, M], new cache, history rows).
    Public for tools that need a step's hidden states (scripts/bench_sparse_verify.py).

    The model's own cached stack (`forward_hidden`) runs over this step's cache views: the rows'
    rings of sparse sublayers and the page pools of full ones, seen through the block tables.
    Page key bounds, when the cache keeps them, are updated; `select` (a sparse_verify.Selector,
    or with A²ATS retrieval a sparse_verify_retrieval.RetrievalSelector) picks the pages or keys
    each full sublayer attends to.
    """
    s = inp.tokens.shape[1]
    positions = inp.starts[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
    valid = jnp.arange(s)[None, :] < inp.num_valid[:, None]
    history = None
    if cfg.ngram.enabled:
        history = jnp.where(inp.reset[:, None], 0, _rows(cache.ngram_history, inp.slots))
    bounds = cache.bounds or (None,) * len(cache.layers)
    views = tuple(
        gather_rings(held, inp.slots, inp.reset) if sparse else PagedLayerCache(
            pages=held, block_tables=inp.block_tables, kv_lora_rank=cfg.mla.kv_lora_rank,
            all_valid=all_valid, implementation=implementation, bounds=bnd,
            select=None if bnd is None else select)
        for held, bnd, sparse in zip(cache.layers, bounds, cfg.sparse_layers))
    if cache.retrieval is not None:  # A²ATS: full sublayers attend their retrieved keys
        views = cache.retrieval.views(views, select)
    hidden, new = forward_hidden(cfg, variables, inp.tokens, positions, views, valid, history)
    if cache.retrieval is not None:
        cache = cache.replace(retrieval=cache.retrieval.absorb(new))
    layers = tuple(scatter_rings(held, view, inp.slots) if sparse else view.pages
                   for held, view, sparse in zip(cache.layers, new, cfg.sparse_layers))
    if cache.bounds:
        cache = cache.replace(bounds=tuple(None if sparse else view.bounds
                                           for view, sparse in zip(new, cfg.sparse_layers)))
    return hidden, cache.replace(layers=layers), history


def _update_history(cfg: ModelConfig, cache: ServeCache, inp: StepInputs, history,
                    consumed: Int[Array, "B"]) -> ServeCache:
    if not cfg.ngram.enabled:
        return cache
    new = ngram_history(inp.tokens, consumed, cfg, history)
    return cache.replace(ngram_history=_put_rows(cache.ngram_history, inp.slots, new))


def _mtp(cfg: ModelConfig, variables: Any, mtp_pages: Array, hidden: Float[Array, "B S M"],
         next_ids: Int[Array, "B S"], positions: Int[Array, "B S"], valid, block_tables):
    """MTP block over a paged cache: (features [B, S, M], new pages)."""
    view = PagedLayerCache(pages=mtp_pages, block_tables=block_tables,
                           kv_lora_rank=cfg.mla.kv_lora_rank)
    feats, view = mtp_features(cfg, variables, hidden, next_ids, positions, view, valid)
    return feats, view.pages


def _sample(logits: Float[Array, "B S V"], state: EngineState, inp: StepInputs,
            prev_tokens: Int[Array, "B S"], seeds, key_offset: int = 0):
    """Sampling log-probs of S consecutive positions of each row (penalised, then biased), and
    their keys. The bias goes after the penalties so a -inf (banned) entry stays -inf."""
    counts = _rows(state.counts, inp.slots)
    prompt = _rows(state.prompt_mask, inp.slots)
    penalised = sampling.apply_penalties(logits, counts, prompt, prev_tokens, inp.sampling)
    penalised = _biased(penalised, inp)
    logprobs = sampling.sampling_logprobs(penalised, inp.sampling)
    keys = sampling.request_keys(seeds, inp.gen_steps + key_offset, logits.shape[1])
    return logprobs, keys


def _biased(logits: Float[Array, "B S V"], inp: StepInputs) -> Float[Array, "B S V"]:
    """logits + the rows' logits-processor bias, in float32 (a zero bias is an exact no-op)."""
    return logits.astype(jnp.float32) + inp.bias[:, None, :].astype(jnp.float32)


def _count(state: EngineState, slots, tokens: Int[Array, "B S"], mask) -> Any:
    """counts[slot] += occurrences of tokens[b, mask[b]]."""
    v = state.counts.shape[1]
    add = jnp.zeros((tokens.shape[0], v), jnp.int32)
    add = add.at[jnp.arange(tokens.shape[0])[:, None], tokens].add(mask.astype(jnp.int32))
    return state.counts.at[jnp.where(slots < 0, state.counts.shape[0], slots)].add(add, mode="drop")


def _scores(logits: Float[Array, "B S V"], tokens: Int[Array, "B S"]):
    """(chosen logprob [B, S], top ids [B, S, N], top logprobs [B, S, N]) with N the most any
    request may ask for: always computed, so the number a request asks for picks on the host
    and never adds a compiled shape."""
    num_top = min(sampling.MAX_LOGPROBS, logits.shape[-1])
    return sampling.token_logprobs(logits, tokens, num_top)


def prefill_step(cfg: ModelConfig, variables: Any, state: EngineState, inp: StepInputs,
                 next_tokens: Int[Array, "B"], *, speculative: bool, implementation=None):
    """One chunk per row. Rows whose prompt ends in this chunk (next_tokens[b] < 0) sample their
    first token; the others pass the prompt token that follows the chunk (for the MTP cache).

    Returns (state, first tokens [B], logprob scores (see `_scores`)).
    """
    variables = nn.unbox(variables)
    b, s = inp.tokens.shape
    reset = inp.reset[:, None]
    state = state.replace(
        counts=_put_rows(state.counts, inp.slots, jnp.where(reset, 0, _rows(state.counts, inp.slots))),
        prompt_mask=_put_rows(state.prompt_mask, inp.slots,
                              jnp.where(reset, False, _rows(state.prompt_mask, inp.slots))))
    hidden, cache, history = forward_step(cfg, variables, state.cache, inp, all_valid=False,
                                          implementation=implementation)
    cache = _update_history(cfg, cache, inp, history, inp.num_valid)
    valid = jnp.arange(s)[None, :] < inp.num_valid[:, None]
    seen = _rows(state.prompt_mask, inp.slots).at[jnp.arange(b)[:, None], inp.tokens].max(valid)
    state = state.replace(prompt_mask=_put_rows(state.prompt_mask, inp.slots, seen))

    last = jnp.maximum(inp.num_valid - 1, 0)
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, M]
    logits = project_logits(cfg, last_hidden, variables["params"]["lm_head"])  # [B, 1, V]
    logprobs, keys = _sample(logits, state, inp, jnp.zeros((b, 1), jnp.int32), inp.seeds)
    first = sampling.sample(logprobs, keys)[:, 0]
    final = next_tokens < 0
    state = state.replace(counts=_count(state, jnp.where(final, inp.slots, -1), first[:, None],
                                        jnp.ones((b, 1), bool)))
    if speculative:
        # MTP entry t needs (h_t, token t+1): known for every chunk position except a final
        # chunk's last, which waits as the row's pending input for the first draft.
        follow = jnp.where(final, first, next_tokens)
        shifted = jnp.concatenate([inp.tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
        at_last = jnp.arange(s)[None, :] == last[:, None]
        next_ids = jnp.where(at_last, follow[:, None], shifted)
        mtp_valid = valid & ~(at_last & final[:, None])
        positions = inp.starts[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
        _, mtp_pages = _mtp(cfg, variables, cache.mtp, hidden, next_ids, positions, mtp_valid,
                            inp.block_tables)
        cache = cache.replace(mtp=mtp_pages)
        k1 = state.pending_hidden.shape[1]
        pend_slots = jnp.where(final, inp.slots, -1)
        pend_h = jnp.zeros((b, k1, hidden.shape[-1]), state.pending_hidden.dtype)
        pend_h = pend_h.at[:, 0].set(last_hidden[:, 0].astype(pend_h.dtype))
        pend_t = jnp.zeros((b, k1), jnp.int32).at[:, 0].set(first)
        state = state.replace(
            pending_hidden=_put_rows(state.pending_hidden, pend_slots, pend_h),
            pending_tokens=_put_rows(state.pending_tokens, pend_slots, pend_t),
            pending_count=_put_rows(state.pending_count, pend_slots, jnp.ones((b,), jnp.int32)),
            pending_start=_put_rows(state.pending_start, pend_slots, inp.starts + last))
    state = state.replace(cache=cache)
    return state, first, _scores(_biased(logits, inp), first[:, None])


def decode_step(cfg: ModelConfig, variables: Any, state: EngineState, inp: StepInputs, *,
                implementation=None):
    """One token per row (the previous step's sample). Returns (state, tokens [B], scores)."""
    variables = nn.unbox(variables)
    b = inp.tokens.shape[0]
    hidden, cache, history = forward_step(cfg, variables, state.cache, inp, all_valid=True,
                                          implementation=implementation)
    cache = _update_history(cfg, cache, inp, history, inp.num_valid)
    logits = project_logits(cfg, hidden, variables["params"]["lm_head"])  # [B, 1, V]
    logprobs, keys = _sample(logits, state, inp, jnp.zeros((b, 1), jnp.int32), inp.seeds)
    tokens = sampling.sample(logprobs, keys)[:, 0]
    state = state.replace(cache=cache, counts=_count(state, inp.slots, tokens[:, None],
                                                     jnp.ones((b, 1), bool)))
    return state, tokens, _scores(_biased(logits, inp), tokens[:, None])


def speculative_step(cfg: ModelConfig, variables: Any, state: EngineState, inp: StepInputs, *,
                     num_draft: int, implementation=None,
                     sparse_verify: Optional[sv.SparseVerifyConfig] = None):
    """One MTP round per row: k drafts, one verify pass of k+1 tokens, the standard acceptance rule.

    inp.tokens [B, 1] holds each row's last sampled token x_n (position n = starts). The drafts
    start from the row's pending MTP inputs (main hidden states whose next token is now known),
    so the MTP cache always holds entries computed from main-model hidden states; later drafts
    of a round feed the MTP's own features back (one MTP layer, applied k times).

    With `sparse_verify` (and page bounds in the state) the verify pass attends to the pages
    lcjax/sparsity/sparse_verify.py selects; with A²ATS retrieval in the cache instead, to the
    keys the score query retrieves (lcjax/sparsity/sparse_verify_retrieval.py). The acceptance
    rule is unchanged.

    Returns (state, tokens [B, k+1] (first accepted+1 valid), accepted [B], scores).
    """
    variables = nn.unbox(variables)
    params = variables["params"]
    b = inp.tokens.shape[0]
    k, k1 = num_draft, num_draft + 1
    slots = inp.slots
    # 1. Draft: MTP over the pending entries; the last one's features predict token n+1.
    pend_h = _rows(state.pending_hidden, slots)
    pend_t = _rows(state.pending_tokens, slots)
    pend_n = _rows(state.pending_count, slots)
    pend_start = _rows(state.pending_start, slots)
    positions = pend_start[:, None] + jnp.arange(k1, dtype=jnp.int32)[None, :]
    valid = jnp.arange(k1)[None, :] < pend_n[:, None]
    feats, mtp_pages = _mtp(cfg, variables, state.cache.mtp, pend_h, pend_t, positions, valid,
                            inp.block_tables)
    feat = jnp.take_along_axis(feats, jnp.maximum(pend_n - 1, 0)[:, None, None], axis=1)
    draft_seeds = inp.seeds ^ jnp.uint32(DRAFT_SEED_SALT)
    drafts, draft_logprobs = [], []
    for j in range(k):
        logits = project_logits(cfg, feat, params["lm_head"])  # [B, 1, V]
        prev = jnp.zeros((b, 1), jnp.int32)
        lp, keys = _sample(logits, state, inp, prev, draft_seeds, key_offset=j)
        token = sampling.sample(lp, keys)  # [B, 1]
        drafts.append(token)
        draft_logprobs.append(lp)
        if j + 1 < k:
            pos = (inp.starts + j)[:, None]
            feat, mtp_pages = _mtp(cfg, variables, mtp_pages, feat, token, pos,
                                   jnp.ones((b, 1), bool), inp.block_tables)
    drafts = jnp.concatenate(drafts, axis=1)  # [B, k]
    draft_logprobs = jnp.concatenate(draft_logprobs, axis=1)  # [B, k, V]
    # 2. Verify x_n, d_1..d_k in one pass of the main model.
    verify = inp.replace(tokens=jnp.concatenate([inp.tokens, drafts], axis=1),
                         num_valid=jnp.full((b,), k1, jnp.int32))
    select, verify_cfg, verify_vars = None, cfg, variables
    if sparse_verify is not None:
        if state.cache.retrieval is not None:
            select = RetrievalSelector(sparse_verify)
        elif not state.cache.bounds:
            raise ValueError("sparse_verify needs page bounds: init_engine_state(page_bounds=True)")
        else:
            select = sv.Selector(sparse_verify)
        verify_cfg = sv.verify_model_config(cfg, sparse_verify)  # the MoE rule
        verify_vars = sv.verify_variables(variables)  # verify-only FFN thresholds, if any
    hidden, cache, history = forward_step(verify_cfg, verify_vars, state.cache, verify,
                                          all_valid=True, implementation=implementation,
                                          select=select)
    logits = project_logits(cfg, hidden, params["lm_head"])  # [B, k+1, V]
    prev = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    target, _ = _sample(logits, state, inp, prev, inp.seeds)
    accept_keys = sampling.request_keys(inp.seeds, inp.gen_steps, 1)[:, 0]
    # Rows with num_draft 0 (a logits processor must see every token) take one token from the
    # verify pass's first position, as a plain decode step would.
    accepted, tokens = sampling.speculative_accept(target, draft_logprobs, drafts,
                                                   jnp.minimum(inp.num_draft, k), accept_keys)
    emitted = jnp.arange(k1)[None, :] <= accepted[:, None]
    # Only x_n and the accepted drafts were consumed: the n-gram history must not see the rest.
    cache = _update_history(cfg, cache, verify, history, accepted + 1)
    state = state.replace(
        cache=cache.replace(mtp=mtp_pages),
        counts=_count(state, slots, tokens, emitted),
        pending_hidden=_put_rows(state.pending_hidden, slots, hidden.astype(state.pending_hidden.dtype)),
        pending_tokens=_put_rows(state.pending_tokens, slots, tokens),
        pending_count=_put_rows(state.pending_count, slots, accepted + 1),
        pending_start=_put_rows(state.pending_start, slots, inp.starts))
    return state, tokens, accepted, _scores(_biased(logits, inp), tokens)
