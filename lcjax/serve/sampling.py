"""Per-request sampling on device: penalties, filtered distributions, keys, speculative acceptance.

The engine turns each request's `SamplingParams` into one row of `SamplingTensors` (host side),
so a whole batch with mixed settings samples in one jitted call. Everything here works on
S consecutive positions per row: S = 1 for plain decode, S = k + 1 when verifying k drafts.

Pipeline per position: `apply_penalties` (vLLM semantics) -> `sampling_logprobs` (temperature,
top-k, top-p, min-p; the log-probs of the distribution actually sampled from, which speculative
acceptance needs) -> `sample` (Gumbel-max with a per-request, per-token key from `request_keys`,
so a seeded request gives the same text whatever it is batched with).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Integer, UInt32

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
KEY_IMPL = "threefry2x32"  # raw key data is [2] uint32


@typing.no_type_check  # user input: `validate` raises ValueError, not the test-time type checker
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings (OpenAI/vLLM names and semantics)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0  # [0, 1]
    repetition_penalty: float = 1.0  # > 0; vLLM semantics (prompt + output tokens)
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: Optional[int] = None  # same seed -> same text
    logprobs: Optional[int] = None  # None = off; k >= 0: chosen token's logprob + top-k alternatives
    min_tokens: int = 0

    @classmethod
    def create(cls, **kwargs) -> "SamplingParams":
        """Build from loose (JSON-like) values: lists -> tuples, a lone stop string -> (str,),
        None -> the default, ints -> floats for float fields; unknown keys raise ValueError."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in kwargs.items():
            if key not in fields:
                raise ValueError(f"unknown sampling parameter {key!r}; known: {sorted(fields)}")
            if value is None:
                continue
            if key == "stop" and isinstance(value, str):
                value = (value,)
            elif key in ("stop", "stop_token_ids") and isinstance(value, list):
                value = tuple(value)
            elif fields[key].type == "float" and _is_int(value):
                value = float(value)
            values[key] = value
        return cls(**values)

    @property
    def greedy(self) -> bool:
        """temperature 0: always the most likely token (filters are then irrelevant)."""
        return self.temperature == 0

    def validate(self, vocab_size: int, max_tokens_limit: int | None = None) -> None:
        """Raise ValueError naming the field and value of the first setting out of range."""
        _check_int("max_tokens", self.max_tokens, 1, max_tokens_limit)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        _check_real("temperature", self.temperature, 0.0, 100.0)
        _check_real("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_int("top_k", self.top_k, -1, vocab_size)
        _check_real("min_p", self.min_p, 0.0, 1.0)
        _check_real("repetition_penalty", self.repetition_penalty, 0.0, 100.0, low_open=True)
        _check_real("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_real("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a tuple of strings; got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings; got {len(self.stop)}")
        if "" in self.stop:
            raise ValueError(f"stop strings must be non-empty; got {self.stop!r}")
        if not isinstance(self.stop_token_ids, tuple):
            raise ValueError(f"stop_token_ids must be a tuple of ints; got {self.stop_token_ids!r}")
        for token in self.stop_token_ids:
            _check_int("stop_token_ids", token, 0, vocab_size - 1)
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise ValueError(f"ignore_eos must be a bool; got {self.ignore_eos!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_int(name: str, value, low: int, high: Optional[int]) -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer in {bound}; got {value!r}")


def _check_real(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    ok = (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
          and not math.isnan(value) and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        raise ValueError(f"{name} must be a number in {'(' if low_open else '['}{low}, {high}]; "
                         f"got {value!r}")


@flax.struct.dataclass
class SamplingTensors:
    """Per-row sampling settings of one batch (all shape [B]; numpy from `sampling_tensors`)."""

    temperature: Any  # [B] float32 (greedy rows hold 1.0 and greedy=True)
    top_p: Any  # [B] float32
    top_k: Any  # [B] int32, 0 = off
    min_p: Any  # [B] float32
    repetition_penalty: Any  # [B] float32
    presence_penalty: Any  # [B] float32
    frequency_penalty: Any  # [B] float32
    greedy: Any  # [B] bool


def sampling_tensors(params: Sequence[Optional[SamplingParams]], pad_to: int) -> SamplingTensors:
    """Stack requests' settings into [pad_to] rows; None entries and rows past the end are padding
    (greedy, neutral). Host-side numpy, so building a step costs no device dispatch."""
    if len(params) > pad_to:
        raise ValueError(f"pad_to={pad_to} is smaller than the {len(params)} rows given")
    cols = {name: [] for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                  "presence_penalty", "frequency_penalty", "greedy")}
    for p in list(params) + [None] * (pad_to - len(params)):
        greedy = p is None or p.greedy
        cols["greedy"].append(greedy)
        cols["temperature"].append(1.0 if greedy else p.temperature)
        # Filters do nothing for greedy rows; neutral values let the batch skip the sort.
        cols["top_p"].append(1.0 if greedy else p.top_p)
        cols["top_k"].append(0 if greedy or p.top_k < 0 else p.top_k)
        cols["min_p"].append(0.0 if greedy else p.min_p)
        cols["repetition_penalty"].append(1.0 if p is None else p.repetition_penalty)
        cols["presence_penalty"].append(0.0 if p is None else p.presence_penalty)
        cols["frequency_penalty"].append(0.0 if p is None else p.frequency_penalty)
    dtypes = {"top_k": np.int32, "greedy": np.bool_}
    return SamplingTensors(**{k: np.asarray(v, dtypes.get(k, np.float32)) for k, v in cols.items()})


def apply_penalties(logits: Float[Array, "B S V"], output_counts: Int[Array, "B V"],
                    prompt_mask: Bool[Array, "B V"], prev_tokens: Int[Array, "B S"],
                    t: SamplingTensors) -> Float[Array, "B S V"]:
    """Repetition, frequency and presence penalties (vLLM semantics) at S consecutive positions.

    Position s sees output_counts plus prev_tokens[:, :s] (the drafts before it, when verifying).
    Repetition: tokens in the prompt or output get logit/rp if positive, logit*rp otherwise; then
    logit -= frequency * count + presence * (count > 0) over output tokens only. Untouched entries
    (all of a neutral row) are returned bit-identical. Cost: a few [B, S, V] elementwise passes.
    """
    s, v = logits.shape[1], logits.shape[2]
    counts_bsv = jnp.broadcast_to(output_counts[:, None, :], logits.shape)
    if s > 1:
        onehot_bsv = (prev_tokens[:, :, None] == jnp.arange(v)[None, None, :]).astype(jnp.int32)
        counts_bsv = counts_bsv + jnp.cumsum(onehot_bsv, axis=1) - onehot_bsv  # tokens before s
    x = logits.astype(jnp.float32)
    rp = t.repetition_penalty[:, None, None].astype(jnp.float32)
    seen = prompt_mask[:, None, :] | (counts_bsv > 0)
    x = jnp.where(seen & (rp != 1.0), jnp.where(x > 0, x / rp, x * rp), x)
    adjust = (t.frequency_penalty[:, None, None].astype(jnp.float32) * counts_bsv
              + t.presence_penalty[:, None, None].astype(jnp.float32) * (counts_bsv > 0))
    x = jnp.where(adjust != 0, x - adjust, x)
    return x.astype(logits.dtype)  # exact round trip for untouched entries


def sampling_logprobs(logits: Float[Array, "B S V"], t: SamplingTensors) -> Float[Array, "B S V"]:
    """float32 log-probs of the distribution each row samples from (-inf = never sampled).

    z = logits / temperature; then top-k, top-p over the top-k survivors, min-p, renormalised.
    Filters compare values, so tied tokens are kept or dropped together:
      top-k keeps z >= the k-th largest z (ties with it included; top_k <= 0 or >= V: off);
      top-p keeps a token iff the mass of strictly more probable tokens is < top_p (the smallest
        set reaching top_p, plus everything tied with its least probable member; top_p = 1: off);
      min-p keeps p >= min_p * max p.
    Greedy rows: 0 at the argmax of the logits (first index on ties), -inf elsewhere.
    Cost: one [B, S, V] sort, skipped when no sampled row uses top-k or top-p.
    """
    v = logits.shape[-1]
    z = logits.astype(jnp.float32) / t.temperature[:, None, None].astype(jnp.float32)
    neg_inf = jnp.float32(-jnp.inf)
    top_k = jnp.asarray(t.top_k, jnp.int32)
    top_p = jnp.asarray(t.top_p, jnp.float32)
    greedy = jnp.asarray(t.greedy, bool)

    def sorted_cutoff(z):
        """Smallest z each row keeps under top-k and top-p ([B, S, 1])."""
        desc = -jnp.sort(-z, axis=-1)
        k = jnp.where((top_k <= 0) | (top_k >= v), v, top_k)[:, None, None]
        kth = jnp.take_along_axis(desc, k - 1, axis=-1)
        desc = jnp.where(desc >= kth, desc, neg_inf)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        n_keep = jnp.sum(before < top_p[:, None, None], axis=-1, keepdims=True)  # >= 1
        pth = jnp.take_along_axis(desc, jnp.maximum(n_keep, 1) - 1, axis=-1)
        return jnp.where(top_p[:, None, None] >= 1.0, kth, jnp.maximum(kth, pth))

    active = ~greedy & (((top_k > 0) & (top_k < v)) | (top_p < 1.0))
    cutoff = jax.lax.cond(jnp.any(active), sorted_cutoff,
                          lambda z: jnp.full(z.shape[:-1] + (1,), neg_inf), z)
    zmax = jnp.max(z, axis=-1, keepdims=True)
    log_min_p = jnp.log(jnp.asarray(t.min_p, jnp.float32))[:, None, None]
    keep = (z >= cutoff) & (z - zmax >= log_min_p)
    sampled = jax.nn.log_softmax(jnp.where(keep, z, neg_inf), axis=-1)
    best = jnp.argmax(logits, axis=-1)[..., None] == jnp.arange(v)
    greedy_lp = jnp.where(best, jnp.float32(0), neg_inf)
    return jnp.where(greedy[:, None, None], greedy_lp, sampled)


def sample(logprobs: Float[Array, "B S V"], keys: UInt32[Array, "B S 2"]) -> Int[Array, "B S"]:
    """One categorical draw per row and position (Gumbel-max; greedy rows give their argmax)."""
    b, s, v = logprobs.shape
    flat_keys = jax.random.wrap_key_data(keys.reshape(b * s, 2), impl=KEY_IMPL)
    tokens = jax.vmap(jax.random.categorical)(flat_keys, logprobs.reshape(b * s, v))
    return tokens.reshape(b, s).astype(jnp.int32)


def request_keys(seeds: Integer[Array, "B"], steps: Int[Array, "B"],
                 num: int) -> UInt32[Array, "B {num} 2"]:
    """Raw keys for each row's next `num` tokens: fold_in(PRNGKey(seed), step + j).

    Depends only on the request's seed and token index, so seeded output does not depend on
    batching, bucket padding or speculative acceptance.
    """
    def row(seed, step):
        base = jax.random.key(seed.astype(jnp.uint32), impl=KEY_IMPL)
        idx = step.astype(jnp.uint32) + jnp.arange(num, dtype=jnp.uint32)
        return jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(base, i)))(idx)

    return jax.vmap(row)(seeds, steps)


def token_logprobs(logits: Float[Array, "B S V"], tokens: Int[Array, "B S"], num_top: int
                   ) -> tuple[Float[Array, "B S"], Int[Array, "B S {num_top}"],
                              Float[Array, "B S {num_top}"]]:
    """Model log-probs reported to the user: log_softmax of the raw logits in float32.

    Returns (chosen token's logprob [B, S], top-num_top ids and logprobs [B, S, num_top], best
    first, lower id first on ties). num_top is static; 0 gives empty arrays.
    """
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # float32: sums over V
    chosen = jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]
    if num_top == 0:
        b, s = tokens.shape
        return chosen, jnp.zeros((b, s, 0), jnp.int32), jnp.zeros((b, s, 0), jnp.float32)
    top_lp, top_ids = jax.lax.top_k(lp, num_top)
    return chosen, top_ids.astype(jnp.int32), top_lp


def speculative_accept(target_logprobs: Float[Array, "B K1 V"], draft_logprobs: Float[Array, "B K V"],
                       draft_tokens: Int[Array, "B K"], num_draft: Int[Array, "B"],
                       keys: UInt32[Array, "B 2"]) -> tuple[Int[Array, "B"], Int[Array, "B K1"]]:
    """Speculative sampling that preserves the target distribution (Leviathan et al. 2023, Alg. 1).

    Draft d_j (j < num_draft) is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the
    first rejection the replacement comes from norm(max(0, p_j - q_j)) (p_j if that is all zero),
    after num_draft acceptances a bonus token comes from p_{num_draft}. With a one-hot p this is
    exactly "accept while d_j == argmax p_j, then emit argmax", whatever the key.

    Returns (num_accepted [B], tokens [B, K+1]: accepted drafts, then the corrected or bonus
    token, then zeros).
    """
    k1, k = target_logprobs.shape[1], draft_tokens.shape[1]
    if k1 != k + 1:
        raise ValueError(f"target_logprobs has {k1} positions; expected {k} drafts + 1")

    def row(p_lp, q_lp, drafts, n_draft, key):
        key_accept, key_final = jax.random.split(jax.random.wrap_key_data(key, impl=KEY_IMPL))
        p_d = jnp.take_along_axis(p_lp[:k], drafts[:, None], axis=-1)[:, 0]
        q_d = jnp.take_along_axis(q_lp, drafts[:, None], axis=-1)[:, 0]
        log_u = jnp.log(jax.random.uniform(key_accept, (k,)))
        # u < p/q in logs; log q(d) <= 0, so a one-hot p accepts its argmax whatever u is.
        accept = (log_u < p_d - q_d) & (jnp.arange(k) < n_draft)
        n_acc = jnp.sum(jnp.cumprod(accept.astype(jnp.int32)))
        p = p_lp[n_acc]
        q = q_lp[jnp.minimum(n_acc, k - 1)]
        residual = jnp.maximum(jnp.exp(p) - jnp.exp(q), 0.0)
        use_residual = (n_acc < n_draft) & (jnp.sum(residual) > 0)
        final = jax.random.categorical(key_final, jnp.where(use_residual, jnp.log(residual), p))
        padded = jnp.concatenate([drafts, jnp.zeros((1,), drafts.dtype)])
        pos = jnp.arange(k1)
        tokens = jnp.where(pos < n_acc, padded, jnp.where(pos == n_acc, final, 0))
        return n_acc.astype(jnp.int32), tokens.astype(jnp.int32)

    return jax.vmap(row)(target_logprobs.astype(jnp.float32), draft_logprobs.astype(jnp.float32),
                         draft_tokens, num_draft, keys)
