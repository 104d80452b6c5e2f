"""Sparse verification of speculative drafts: Quest-style page retrieval shared by draft tokens.

The verify pass of MTP speculative decoding runs k+1 query tokens (x_n, d_1..d_k) through the
main model over the whole KV cache. Following "Accelerate Speculative Decoding with Sparse
Computation in Verification" (arXiv 2512.21911), the pages those tokens need are nearly the same
for all of them and for adjacent layers, so in each full-attention sublayer:

  1. one verify token (`score_query`, default the first) scores every page of its row with the
     Quest upper bound  sum_d max(q_d * min_d, q_d * max_d)  on the page's per-dimension key
     bounds (kept beside the paged cache, `update_bounds`), reduced over heads;
  2. the top `block_budget` pages are kept, sink pages and the local window (the last
     `local_blocks` pages and every page holding a verified token) always among them;
  3. every verify token attends to those pages only (the same set, so one gather serves all),
     with the usual causal mask inside the draft;
  4. the set is reused by the next `reuse_layers - 1` full-attention sublayers.

For absorbed MLA the keys are the cached rows [normed latent c_kv | roped k_rope] (C+R dims) and
the query is the absorbed q_abs = [q_nope W_uk | q_rope], so the bounds cover all C+R dims and the
score is exactly Quest's on the multi-query attention decode runs. LoZA sparse sublayers are
left as they are: they already read only sink + local blocks from a per-slot ring.

Attention over the kept pages is the ordinary paged decode op on a compressed block table
(`compress`): the kept logical pages in ascending order, and a length that ends at the row's
last token. Every skipped page lies wholly before the first verify token and the local pages
are contiguous, so the causal mask on compressed positions equals the mask on true ones; with
every page kept, the result is exactly the dense one.

FFN and MoE in the verify pass: `moe_rule` restricts routing (`verify_model_config`: a row's
verify tokens route among the experts its first token chose, or experts below a router
probability floor are skipped), and CHESS thresholds given with `with_verify_thresholds` zero
small FFN / expert activations of the verify pass only (drafting, prefill and plain decode stay
dense; `ffn="chess:s=S"` asks the server to calibrate them at startup). The paper's exact FFN /
MoE rules are not public; these are our settings.

What sparse verification changes is the verifier, not the acceptance rule: the target
distribution the drafts are tested against is the sparse verifier's, and the standard
speculative rule keeps the output distributed exactly as that verifier's own sampling (greedy:
its argmax). The KV entries the verify pass writes for accepted tokens, and the hidden states
the next drafts start from, are the sparse verifier's too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from lcjax.config import ModelConfig
from lcjax.ops import activation_sparsity
from lcjax.sparsity.chess import ChessThresholds, parse_spec

HEAD_REDUCE = ("max", "sum")
MOE_RULES = ("none", "first_token", "weight_floor")
# Variables collection holding FFN / expert activation thresholds used by the verify pass only
# (moved into activation_sparsity.COLLECTION there; every other step ignores it).
VERIFY_COLLECTION = "verify_thresholds"


@dataclasses.dataclass(frozen=True)
class SparseVerifyConfig:
    """Settings of sparse verification (pages = blocks: one KV page is one retrieval block)."""

    block_budget: int = 64  # pages attended per row per full sublayer (sinks + local included)
    sink_blocks: int = 1  # first pages always kept
    local_blocks: int = 4  # most recent pages always kept (plus the pages of the verify tokens)
    reuse_layers: int = 2  # consecutive full-attention sublayers sharing one selection
    dense_first: int = 0  # the first N full-attention sublayers attend to every page
    score_query: int = 0  # the verify token whose query scores pages (0: x_n)
    head_reduce: str = "max"  # how per-head Quest scores become one score per page
    # MoE in verify: "first_token" routes a row's verify tokens among the experts its first
    # token picked; "weight_floor" drops routed experts whose weight < moe_weight_floor.
    moe_rule: str = "none"
    moe_weight_floor: float = 0.0
    # CHESS in verify only: a lcjax.sparsity.chess spec ("chess:s=0.5", "cats:s=0.3", ...) whose
    # thresholds the server calibrates at startup and installs with `with_verify_thresholds`
    # (Python API: install them yourself; the engine refuses the setting without them).
    ffn: str = "none"

    def __post_init__(self):
        for name in ("block_budget", "sink_blocks", "local_blocks", "dense_first", "score_query"):
            if getattr(self, name) < 0:
                raise ValueError(f"sparse_verify.{name}={getattr(self, name)} must be >= 0")
        if self.reuse_layers < 1:
            raise ValueError(f"sparse_verify.reuse_layers={self.reuse_layers} must be >= 1")
        if self.head_reduce not in HEAD_REDUCE:
            raise ValueError(f"sparse_verify.head_reduce={self.head_reduce!r} must be one of "
                             f"{HEAD_REDUCE}")
        if self.moe_rule not in MOE_RULES:
            raise ValueError(f"sparse_verify.moe_rule={self.moe_rule!r} must be one of {MOE_RULES}")
        if self.ffn != "none":
            try:
                parse_spec(self.ffn)
            except ValueError as err:
                raise ValueError(f"sparse_verify.ffn={self.ffn!r}: {err}") from None
        if not 0 <= self.moe_weight_floor < 1 or (self.moe_rule == "weight_floor"
                                                   and self.moe_weight_floor == 0):
            raise ValueError(f"sparse_verify.moe_weight_floor={self.moe_weight_floor} must be in "
                             "[0, 1), and > 0 with moe_rule=weight_floor")

    def min_budget(self, num_verify: int, page_size: int) -> int:
        """Fewest pages a budget may hold: sinks, and the local pages or the (at most
        ceil((S-1)/L) + 1) pages the verify tokens span, whichever is more."""
        return self.sink_blocks + max(self.local_blocks, (num_verify + page_size - 2) // page_size + 1)

    def check(self, num_verify: int, page_size: int) -> None:
        """ValueError unless the budget holds every always-kept page (0 = every page)."""
        need = self.min_budget(num_verify, page_size)
        if self.block_budget and self.block_budget < need:
            raise ValueError(f"sparse_verify.block_budget={self.block_budget} must be 0 (every "
                             f"page) or >= {need}: sink_blocks + local_blocks + the pages of "
                             f"{num_verify} verify tokens at page_size={page_size}")


def verify_model_config(cfg: ModelConfig, settings: SparseVerifyConfig) -> ModelConfig:
    """The model config of the verify pass: the MoE rule as the router's restrictions.

    "first_token": each row's verify tokens route among the routed experts its first token
    (x_n) picked, so a row's verify block loads at most top_k experts instead of up to
    (k+1) top_k; "weight_floor": routed experts with router probability < moe_weight_floor are
    skipped (their weight is lost, not renormalised, as LongCat's router never renormalises).
    """
    if settings.moe_rule == "none":
        return cfg
    moe = dataclasses.replace(
        cfg.moe, route_within_first=settings.moe_rule == "first_token",
        route_prob_floor=settings.moe_weight_floor if settings.moe_rule == "weight_floor" else 0.0)
    return dataclasses.replace(cfg, moe=moe)


def with_verify_thresholds(variables: dict, thresholds: Optional[ChessThresholds]) -> dict:
    """`variables` whose verify pass (only) applies CHESS `thresholds` (lcjax.sparsity.chess)."""
    out = {k: v for k, v in variables.items() if k != VERIFY_COLLECTION}
    if thresholds is not None:
        out[VERIFY_COLLECTION] = thresholds.tree
    return out


def verify_variables(variables: dict) -> dict:
    """The variables the verify pass runs: verify-only thresholds become the model's."""
    if VERIFY_COLLECTION not in variables:
        return variables
    out = {k: v for k, v in variables.items() if k != VERIFY_COLLECTION}
    out[activation_sparsity.COLLECTION] = variables[VERIFY_COLLECTION]
    return out


def parse_settings(text: str) -> SparseVerifyConfig:
    """`key=value,key=value` (fields of SparseVerifyConfig) -> config; '' gives the defaults."""
    fields = {f.name: f.type for f in dataclasses.fields(SparseVerifyConfig)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"sparse-verify setting {item!r} must be key=value with key in "
                             f"{sorted(fields)}")
        default = getattr(SparseVerifyConfig, key)
        kwargs[key] = type(default)(value) if not isinstance(default, str) else value
    return SparseVerifyConfig(**kwargs)


def update_bounds(bounds: Float[Array, "P 2 W"], pages: Float[Array, "P L W"],
                  block_tables: Int[Array, "B N"], positions: Int[Array, "B S"],
                  valid: Bool[Array, "B S"]) -> Float[Array, "P 2 W"]:
    """Recompute [min, max] of every page the step wrote, over the row's tokens so far.

    Called after the step's tokens are filed into `pages`. A touched page is re-read whole
    (masked to positions < the row's new length), so tokens of a rejected draft drop out of the
    bounds as soon as their page is written again, and a recycled page forgets its old owner.
    Cost per row: ceil((S-1)/L)+1 pages read, the same written.
    """
    num_pages, page, _ = pages.shape
    _, width = block_tables.shape
    s_len = positions.shape[1]
    touch = min(width, (s_len - 1 + page - 1) // page + 1)
    big = jnp.iinfo(jnp.int32).max
    first = jnp.min(jnp.where(valid, positions, big), axis=1) // page  # [B]
    length = jnp.max(jnp.where(valid, positions + 1, 0), axis=1)  # [B]
    logical = first[:, None] + jnp.arange(touch, dtype=jnp.int32)[None, :]  # [B, T]
    ok = (logical * page < length[:, None]) & (logical < width)
    phys = jnp.take_along_axis(block_tables, jnp.clip(logical, 0, width - 1), axis=1)
    data = pages[phys].astype(jnp.float32)  # [B, T, L, W]
    slot_pos = logical[..., None] * page + jnp.arange(page)[None, None, :]  # [B, T, L]
    inside = (slot_pos < length[:, None, None])[..., None]
    lo = jnp.min(jnp.where(inside, data, jnp.inf), axis=2)
    hi = jnp.max(jnp.where(inside, data, -jnp.inf), axis=2)
    new = jnp.stack([lo, hi], axis=2).astype(bounds.dtype)  # [B, T, 2, W]
    idx = jnp.where(ok, phys, num_pages).reshape(-1)
    return bounds.at[idx].set(new.reshape(-1, *bounds.shape[1:]), mode="drop")


def page_scores(query: Float[Array, "B H W"], bounds: Float[Array, "B N 2 W"],
                head_reduce: str = "max") -> Float[Array, "B N"]:
    """Quest bound of q.k over each page, sum_d max(q_d lo_d, q_d hi_d), reduced over heads.

    max(q lo, q hi) = relu(q) hi + min(q, 0) lo since hi >= lo: two matmuls, float32.
    """
    q = query.astype(jnp.float32)
    lo, hi = bounds[:, :, 0].astype(jnp.float32), bounds[:, :, 1].astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    per_head = (jnp.einsum("BHW,BNW->BHN", jnp.maximum(q, 0), hi, precision=hp)
                + jnp.einsum("BHW,BNW->BHN", jnp.minimum(q, 0), lo, precision=hp))
    return jnp.max(per_head, axis=1) if head_reduce == "max" else jnp.sum(per_head, axis=1)


def forced_pages(lengths: Int[Array, "B"], num_verify: int, page: int, width: int,
                 cfg: SparseVerifyConfig) -> tuple[Bool[Array, "B N"], Bool[Array, "B N"]]:
    """(always-kept pages: sinks and the local window incl. the verify tokens' pages, pages past
    the row's last) over the N logical pages of each row."""
    used = (lengths + page - 1) // page  # [B]
    local_start = jnp.minimum((lengths - num_verify) // page, used - cfg.local_blocks)
    idx = jnp.arange(width, dtype=jnp.int32)[None, :]
    return (idx < cfg.sink_blocks) | (idx >= local_start[:, None]), idx >= used[:, None]


def select_pages(scores: Float[Array, "B N"], lengths: Int[Array, "B"], num_verify: int,
                 page: int, cfg: SparseVerifyConfig) -> Int[Array, "B K"]:
    """Logical pages kept per row, ascending: forced sinks + local pages, then the best scores.

    K = min(block_budget, N). Pages past the row's last are scored -inf: chosen only when the
    row has fewer pages than K, and then they sort after its last page (masked by `compress`).
    """
    width = scores.shape[1]
    keep = min(cfg.block_budget, width) if cfg.block_budget else width
    forced, past = forced_pages(lengths, num_verify, page, width, cfg)
    scores = jnp.where(forced, jnp.inf, scores.astype(jnp.float32))
    scores = jnp.where(past, -jnp.inf, scores)
    _, chosen = jax.lax.top_k(scores, keep)
    return jnp.sort(chosen, axis=1).astype(jnp.int32)


def retrieved(chosen: Int[Array, "B ... K"], lengths: Int[Array, "B"], num_verify: int,
              page: int, width: int, cfg: SparseVerifyConfig) -> Int[Array, "B ... K"]:
    """The chosen pages that were retrieved by score (forced and past-the-end ones set to -1):
    the sets the overlap statistic compares."""
    forced, past = forced_pages(lengths, num_verify, page, width, cfg)
    drop = forced | past
    drop = drop.reshape(drop.shape[:1] + (1,) * (chosen.ndim - 2) + drop.shape[1:])
    hit = jnp.take_along_axis(jnp.broadcast_to(drop, chosen.shape[:-1] + (width,)), chosen, -1)
    return jnp.where(hit, -1, chosen)


def compress(block_tables: Int[Array, "B N"], chosen: Int[Array, "B K"], lengths: Int[Array, "B"],
             page: int) -> tuple[Int[Array, "B K"], Int[Array, "B"]]:
    """(block table of the kept pages, length in compressed positions) for paged attention.

    The row's last page is kept (local), so it is the m-th kept page with m = kept pages up to
    it; the compressed length is (m-1) pages plus the tokens of the last page.
    """
    last = (lengths - 1) // page
    kept = jnp.sum(chosen <= last[:, None], axis=1)
    tables = jnp.take_along_axis(block_tables, chosen, axis=1)
    return tables, ((kept - 1) * page + lengths - last * page).astype(jnp.int32)


def attention_cost(settings: SparseVerifyConfig, context: int, num_verify: int, page: int,
                   heads: int, key_dim: int, value_dim: int, full_layers: int,
                   itemsize: int) -> dict[str, float]:
    """Per-row verify attention cost over the full-attention sublayers, dense vs sparse.

    FLOPs: 2 S H T (Dk + Dv) per sublayer over T keys; a scoring sublayer adds 4 H N Dk for the
    Quest bound over N pages. Bytes: keys (whose first Dv dims are the values) T Dk, plus the
    2 N Dk bounds read by each scoring sublayer. Sparse sublayers see the kept pages only
    (dense_first sublayers see every page).
    """
    pages = -(-context // page)
    kept = min(settings.block_budget or pages, pages)
    seen = min(kept * page, context)
    dense_first = min(settings.dense_first, full_layers)
    sparse_layers = full_layers - dense_first
    scoring = -(-sparse_layers // settings.reuse_layers)

    def flops(tokens):
        return 2 * num_verify * heads * tokens * (key_dim + value_dim)

    dense_flops = full_layers * flops(context)
    sparse_flops = (dense_first * flops(context) + sparse_layers * flops(seen)
                    + scoring * 4 * heads * pages * key_dim)
    dense_bytes = full_layers * context * key_dim * itemsize
    sparse_bytes = (dense_first * context + sparse_layers * seen + scoring * 2 * pages) * key_dim * itemsize
    return dict(dense_flops=dense_flops, sparse_flops=sparse_flops, dense_bytes=dense_bytes,
                sparse_bytes=sparse_bytes)


def jaccard(a: Int[Array, "... K"], b: Int[Array, "... K"], universe: int) -> Float[Array, "..."]:
    """|a ∩ b| / |a ∪ b| of two index sets, broadcast over leading dims (entries outside
    [0, universe) are ignored; two empty sets give 1)."""
    a, b = jnp.broadcast_arrays(a, b)
    lead = a.shape[:-1]

    def members(x):
        flat = x.reshape(-1, x.shape[-1])
        idx = jnp.where((flat >= 0) & (flat < universe), flat, universe)
        rows = jnp.arange(flat.shape[0])[:, None]
        return jnp.zeros((flat.shape[0], universe + 1), bool).at[rows, idx].set(True)[:, :universe]

    ma, mb = members(a), members(b)
    inter, union = jnp.sum(ma & mb, axis=-1), jnp.sum(ma | mb, axis=-1)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0).reshape(lead)


class Selector:
    """The page choice of one verify pass, handed from the sublayer that scores to its reusers.

    Held by every full-attention sublayer's paged view of one verify step (a static field), it
    is called in layer order while that step is traced, so the k-th call is the k-th
    full-attention sublayer: calls 0..dense_first-1 attend densely, then every `reuse_layers`-th
    call scores pages and the calls between reuse its choice. With `record=True` it also keeps,
    per scoring call, the Jaccard overlap of each verify token's own top-K set with the scoring
    token's (retrieved pages only, and whole kept sets) and of the retrieved pages with the
    previous scoring sublayer's (traced values, read by benchmarks).
    """

    def __init__(self, cfg: SparseVerifyConfig, record: bool = False):
        self.cfg = cfg
        self.record = record
        self.calls = 0
        self.chosen: Optional[Array] = None
        self.token_overlap: list[Array] = []  # per scoring call: [B, S] Jaccard vs score_query
        self.token_overlap_kept: list[Array] = []  # the same over whole kept sets (forced too)
        self.layer_overlap: list[Array] = []  # per scoring call after the first: [B]

    def __call__(self, q_abs: Float[Array, "B S H W"], bounds_pages: Float[Array, "P 2 W"],
                 block_tables: Int[Array, "B N"], lengths: Int[Array, "B"], page: int):
        """(block tables [B, K], lengths [B]) to attend over: compressed, or the dense inputs."""
        cfg, call = self.cfg, self.calls
        self.calls += 1
        if call < cfg.dense_first:
            return block_tables, lengths
        s_len = q_abs.shape[1]
        if (call - cfg.dense_first) % cfg.reuse_layers == 0 or self.chosen is None:
            bounds = bounds_pages[block_tables]  # [B, N, 2, W]
            query = q_abs[:, min(cfg.score_query, s_len - 1)]
            chosen = select_pages(page_scores(query, bounds, cfg.head_reduce), lengths, s_len,
                                  page, cfg)
            if self.record:
                self._record(q_abs, bounds, lengths, page, chosen, block_tables.shape[1])
            self.chosen = chosen
        return compress(block_tables, self.chosen, lengths, page)

    def _record(self, q_abs, bounds, lengths, page, chosen, width):
        s_len, cfg = q_abs.shape[1], self.cfg
        per_token = jnp.stack([
            select_pages(page_scores(q_abs[:, i], bounds, cfg.head_reduce), lengths, s_len,
                         page, cfg) for i in range(s_len)], 1)  # [B, S, K]
        mine = retrieved(chosen, lengths, s_len, page, width, cfg)
        theirs = retrieved(per_token, lengths, s_len, page, width, cfg)
        self.token_overlap.append(jaccard(theirs, mine[:, None, :], width))
        self.token_overlap_kept.append(jaccard(per_token, chosen[:, None, :], width))
        if self.chosen is not None:
            before = retrieved(self.chosen, lengths, s_len, page, width, cfg)
            self.layer_overlap.append(jaccard(mine, before, width))
