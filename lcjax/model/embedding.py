"""Token embedding and the Flash-Lite hashed N-gram embedding (spec §3.2).

For n-gram order n in 2..N and split k in 0..K-1, table j = (n-2)*K + k has M_j = ratio*V + 2j + 1
rows and hashes the token x_t with its n-1 predecessors in the same segment:

    id_j(t) = (x_t + sum_{δ=1}^{n-1} hist_δ(t) * (V^δ mod M_j)) mod M_j
    e(t)    = (E_tok[x_t] + sum_j T_j[id_j(t)] @ P_j) / (1 + K(N-1))

The products reach 2^41, but the ids are computed inside `jit` without x64: the coefficients
V^δ mod M_j are Python ints folded in as constants, and the modular products run in uint32 on
limbs of the token (see `_mulmod`). Shape letters: J tables, G per-table width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from lcjax.config import ModelConfig
from lcjax.ops.host_rows import take_rows

_INIT_STDDEV = 0.02  # HF `initializer_range` for embeddings and Linear layers


def _check_ngram(config: ModelConfig) -> None:
    if not config.ngram.enabled:
        raise ValueError(f"ngram.enabled={config.ngram.enabled!r}: the N-gram embedding is off")


def ngram_moduli(config: ModelConfig) -> tuple[int, ...]:
    """Row count of each hashed table: M_j = ratio*V + 2j + 1, j = (n-2)*K + k (odd, distinct)."""
    _check_ngram(config)
    base = config.ngram.vocab_size_ratio * config.vocab_size
    return tuple(base + 2 * j + 1 for j in range(config.ngram.num_tables))


def _ngram_coefficients(config: ModelConfig) -> tuple[tuple[int, ...], ...]:
    """[J][N-1] host ints V^δ mod M_j for δ = 1..N-1; 0 where δ >= n_j (the order of table j).

    A zero coefficient makes an unused predecessor contribute nothing, so every table can run the
    same N-1 term sum.
    """
    cfg, vocab = config.ngram, config.vocab_size
    coeffs = []
    for j, m in enumerate(ngram_moduli(config)):
        order = j // cfg.split_num + 2
        coeffs.append(tuple(pow(vocab, d, m) if d < order else 0
                            for d in range(1, cfg.neighbor_num)))
    return tuple(coeffs)


def _mulmod(a: Array, c: Array, m: Array, limb_bits: int, num_limbs: int) -> Array:
    """(a * c) mod m in uint32 for a < 2^(limb_bits*num_limbs), c < m, m * 2^limb_bits <= 2^32.

    Horner over the limbs of `a`, most significant first: r <- (r*2^b mod m + limb*c mod m) mod m.
    Each product is below m * 2^b <= 2^32 and each sum below 2m <= 2^32, so nothing wraps.
    """
    mask = jnp.uint32((1 << limb_bits) - 1)
    r = jnp.zeros(jnp.broadcast_shapes(a.shape, c.shape, m.shape), jnp.uint32)
    for i in reversed(range(num_limbs)):
        limb = (a >> jnp.uint32(i * limb_bits)) & mask
        r = ((r << jnp.uint32(limb_bits)) % m + (limb * c) % m) % m
    return r


def _history_context(input_ids: Int[Array, "B S"], history: Int[Array, "B N1"] | None,
                     width: int) -> Int[Array, "B T"]:
    """[history, input_ids]: T = width + S columns, the history zeros when absent."""
    if history is None:
        history = jnp.zeros((input_ids.shape[0], width), jnp.int32)
    if history.shape != (input_ids.shape[0], width):
        raise ValueError(f"history shape {history.shape} is invalid: expected "
                         f"{(input_ids.shape[0], width)} (batch, neighbor_num - 1)")
    return jnp.concatenate([history.astype(jnp.int32), input_ids.astype(jnp.int32)], axis=1)


def _shift_right_ignore_eos(ctx: Int[Array, "B T"], new_segment: Bool[Array, "B T"] | None,
                            shift: int, eos_token_id: int) -> Int[Array, "B T"]:
    """ctx shifted right by `shift`, 0 where the source lies in an earlier segment or before 0.

    Segments end at each EOS (the EOS belongs to the segment before it) and also start wherever
    `new_segment` is True (a packed-document boundary).
    """
    length = ctx.shape[1]
    pos = jnp.arange(length, dtype=jnp.int32)
    after_eos = jnp.concatenate(
        [jnp.zeros_like(ctx[:, :1], dtype=bool), ctx[:, :-1] == eos_token_id], axis=1)
    starts = after_eos if new_segment is None else after_eos | new_segment
    seg_start = jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)
    src = pos - shift
    shifted = jnp.pad(ctx, ((0, 0), (shift, 0)))[:, :length]
    return jnp.where(src[None, :] >= seg_start, shifted, 0)


def ngram_ids(input_ids: Int[Array, "B S"], segment_ids: Int[Array, "B S"] | None,
              history: Int[Array, "B N1"] | None, config: ModelConfig) -> Int[Array, "J B S"]:
    """Row of each of the J = K(N-1) hashed tables for every token (int32, exact, jit-safe).

    Args:
      input_ids: [B, S] token ids in [0, V).
      segment_ids: [B, S] packed-document ids or None; a change between neighbours starts a new
        segment, so history never crosses documents (nor an EOS, which ends its segment).
      history: [B, N-1] tokens preceding input_ids[:, 0], oldest first, 0 where absent (None =
        all absent). They belong to input_ids[:, 0]'s segment, and the EOS rule applies across
        them, so either the raw last N-1 tokens (HF `NgramCache`) or `ngram_history`'s output
        (already zeroed before the last EOS) gives the same ids.
      config: model config with `ngram.enabled`.

    Returns:
      [J, B, S] int32 ids; id_j < M_j. Cost: J*(N-1)*limbs elementwise uint32 ops per token.
    """
    _check_ngram(config)
    moduli = ngram_moduli(config)
    if max(moduli) >= 1 << 24:  # keeps 8-bit limbs exact: m * 2^8 <= 2^32
        raise ValueError(f"ngram modulus {max(moduli)} is invalid: expected < 2^24 "
                         "(uint32 limb arithmetic)")
    width = config.ngram.neighbor_num - 1
    limb_bits = 8
    num_limbs = max(1, -(-(config.vocab_size - 1).bit_length() // limb_bits))
    batch = input_ids.shape[0]

    ctx = _history_context(input_ids, history, width)
    new_segment = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        seg = jnp.concatenate([jnp.repeat(seg[:, :1], width, axis=1), seg], axis=1)
        new_segment = jnp.concatenate(
            [jnp.zeros((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)

    m_j11 = jnp.asarray(moduli, jnp.uint32)[:, None, None]
    coeff_jn = jnp.asarray(_ngram_coefficients(config), jnp.uint32).reshape(-1, width)
    x_bs = input_ids.astype(jnp.uint32)
    ids_jbs = x_bs[None] % m_j11
    for delta in range(1, width + 1):
        hist = _shift_right_ignore_eos(ctx, new_segment, delta, config.eos_token_id)
        hist_bs = hist[:, width:].astype(jnp.uint32)
        term_jbs = _mulmod(hist_bs[None], coeff_jn[:, delta - 1, None, None], m_j11,
                           limb_bits, num_limbs)
        ids_jbs = (ids_jbs + term_jbs) % m_j11  # both < m < 2^24: the sum cannot wrap
    return ids_jbs.astype(jnp.int32)


def ngram_history(input_ids: Int[Array, "B S"], lengths: Int[Array, "B"], config: ModelConfig,
                  history: Int[Array, "B N1"] | None = None) -> Int[Array, "B N1"]:
    """History to carry into the next step after consuming input_ids[b, :lengths[b]].

    The last N-1 tokens of [history, consumed tokens], oldest first, with the last EOS in that
    window and everything before it zeroed (those tokens lie in a finished segment). So after an
    EOS the result is all zeros, and feeding it to `ngram_ids` never needs the EOS rule.

    Args:
      input_ids: [B, S] right-padded tokens; S may be 1 for a decode step.
      lengths: [B] tokens consumed per row, 0 <= lengths[b] <= S.
      config: model config with `ngram.enabled`.
      history: [B, N-1] incoming history (None = no earlier tokens).

    Returns:
      [B, N-1] int32 history for the token after input_ids[b, lengths[b]-1].
    """
    _check_ngram(config)
    width = config.ngram.neighbor_num - 1
    ctx = _history_context(input_ids, history, width)
    # Consumed tokens end at ctx column width + lengths - 1, so the window starts at `lengths`.
    idx = lengths.astype(jnp.int32)[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]
    window = jnp.take_along_axis(ctx, idx, axis=1)
    is_eos = (window == config.eos_token_id).astype(jnp.int32)
    at_or_before_eos = jnp.flip(jax.lax.cummax(jnp.flip(is_eos, 1), axis=1), 1) > 0
    return jnp.where(at_or_before_eos, 0, window)


class TokenEmbedding(nn.Module):
    """Plain lookup table E_tok [V, M]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids: Int[Array, "B S"],
                 out_dtype: jax.typing.DTypeLike | None = None) -> Float[Array, "B S M"]:
        """E_tok[input_ids], cast to `out_dtype` (default config.dtype)."""
        cfg = self.config
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size), jnp.dtype(cfg.param_dtype))  # [V, M]
        out_dtype = jnp.dtype(cfg.dtype) if out_dtype is None else out_dtype
        return jnp.take(embedding, input_ids, axis=0).astype(out_dtype)


class NgramEmbedding(nn.Module):
    """The J hashed tables T_j [M_j, G] and their projections P_j [G, M], summed in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, ids: Int[Array, "J B S"]) -> Float[Array, "B S M"]:
        """sum_j T_j[ids[j]] @ P_j in float32 (not yet averaged with the token embedding)."""
        cfg = self.config
        dim, pdtype = cfg.ngram_table_dim, jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(_INIT_STDDEV)
        rows, projs = [], []
        for j, m in enumerate(ngram_moduli(cfg)):
            table = self.param(
                f"table_{j}", nn.with_logical_partitioning(init, ("ngram_rows", "ngram_dim")),
                (m, dim), pdtype)  # [M_j, G]
            proj = self.param(
                f"proj_{j}", nn.with_logical_partitioning(init, ("ngram_dim", "embed")),
                (dim, cfg.hidden_size), pdtype)  # [G, M]
            rows.append(take_rows(table, ids[j]))  # the table may live in host memory
            projs.append(proj)
        dtype = jnp.dtype(cfg.dtype)
        rows_jbsg = jnp.stack(rows).astype(dtype)
        proj_jgm = jnp.stack(projs).astype(dtype)
        # One batched matmul over all tables, accumulated (and summed over J) in float32.
        return jnp.einsum("JBSG,JGM->BSM", rows_jbsg, proj_jgm,
                          preferred_element_type=jnp.promote_types(dtype, jnp.float32))


class Embedder(nn.Module):
    """Input embedding: token lookup, or its average with the N-gram tables when enabled."""

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids: Array, segment_ids: Int[Array, "B S"] | None = None,
                 history: Int[Array, "B N1"] | None = None) -> Float[Array, "B S M"]:
        """Embed tokens; segment_ids and history only matter to the N-gram hash (see `ngram_ids`).

        Returns [B, S, M] in config.dtype: E_tok[x] when ngram is off, else
        (E_tok[x] + sum_j T_j[id_j] @ P_j) / (1 + K(N-1)) computed in float32.
        """
        cfg = self.config
        # input_ids is [B, S] int, left as a bare `Array` in the signature so that a bad value
        # reaches this check (a ValueError naming it) rather than a runtime type-check error.
        dtype = getattr(input_ids, "dtype", None)
        if (dtype is None or not jnp.issubdtype(dtype, jnp.integer)
                or len(getattr(input_ids, "shape", ())) != 2):
            raise ValueError(f"input_ids dtype={dtype} shape={getattr(input_ids, 'shape', None)} "
                             "is invalid: expected an integer array of shape [batch, seq]")
        tokens = TokenEmbedding(cfg, name="tokens")
        if not cfg.ngram.enabled:
            return tokens(input_ids)
        ids = ngram_ids(input_ids, segment_ids, history, cfg)
        total = tokens(input_ids, jnp.promote_types(cfg.dtype, jnp.float32)) + NgramEmbedding(cfg, name="ngram")(ids)
        return (total / (1 + cfg.ngram.num_tables)).astype(jnp.dtype(cfg.dtype))
