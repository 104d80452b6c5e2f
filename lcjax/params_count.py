"""Closed-form parameter counts from config shapes (total, experts, activated per token).

The formulas mirror the parameter layout the Flax modules create (one term per weight; shapes in
the DESIGN alphabet), so tests can check them against a count over the real param tree. The
router's correction bias is a non-trainable buffer and is never counted.
"""

from __future__ import annotations

import dataclasses

from lcjax.config import Config, MLAConfig, ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameter counts of one model.

    total: backbone (embeddings incl. n-gram tables and projections, layers, final norm, lm_head),
      MTP head excluded. mtp: the MTP head alone. experts / non_expert: split of `total`.
    activated_min / activated_max: parameters one token touches, input embedding rows (token
      embedding and n-gram tables) excluded; min = every top-k slot on a zero expert, max = every
      slot on a routed expert.
    """

    total: int
    mtp: int
    experts: int
    non_expert: int
    activated_min: int
    activated_max: int

    def table(self) -> str:
        """A printable summary: counts in B (or M/K for small models) with exact integers."""
        rows = [
            ("total (backbone, no MTP)", self.total),
            ("  routed experts", self.experts),
            ("  non-expert", self.non_expert),
            ("MTP head", self.mtp),
            ("activated / token, min", self.activated_min),
            ("activated / token, max", self.activated_max),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'parameters':<{width}}  {'size':>9}  {'exact':>17}"]
        lines += [f"{name:<{width}}  {_human(n):>9}  {n:>17,}" for name, n in rows]
        return "\n".join(lines)


def count_params(config: object) -> ParamCount:
    """Count parameters of the model described by `config` (a Config or its ModelConfig).

    `config` is typed `object` so a wrong type reaches the ValueError below.
    """
    cfg = config.model if isinstance(config, Config) else config
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"count_params expects a Config or ModelConfig, got {type(config)!r}")
    m, v, n_layers = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    experts = n_layers * cfg.moe.num_experts * expert_params(cfg)
    input_embedding = v * m + ngram_table_params(cfg)  # rows looked up, not multiplied
    head = m + m * v  # final norm + untied lm_head
    layers = n_layers * logical_layer_params(cfg)
    total = input_embedding + ngram_projection_params(cfg) + layers + head
    activated_min = total - input_embedding - experts
    activated_max = activated_min + n_layers * cfg.moe.top_k * expert_params(cfg)
    return ParamCount(total=total, mtp=mtp_params(cfg), experts=experts,
                      non_expert=total - experts, activated_min=activated_min,
                      activated_max=activated_max)


def mla_params(m: int, mla: MLAConfig) -> int:
    """One MLA sublayer: q_a [M,Q], norm [Q], q_b [Q,H,Dn+Dr], kv_a [M,C+Dr], norm [C],
    kv_b [C,H,Dn+Dv], o [H,Dv,M]."""
    h, q, c = mla.num_heads, mla.q_lora_rank, mla.kv_lora_rank
    dn, dr, dv = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
    return m * q + q + q * h * (dn + dr) + m * (c + dr) + c + c * h * (dn + dv) + h * dv * m


def mlp_params(m: int, f: int) -> int:
    """A SwiGLU MLP: gate [M,F], up [M,F], down [F,M]."""
    return 3 * m * f


def expert_params(cfg: ModelConfig) -> int:
    """One routed expert (a SwiGLU MLP of width expert_ffn_size)."""
    return mlp_params(cfg.hidden_size, cfg.moe.expert_ffn_size)


def logical_layer_params(cfg: ModelConfig) -> int:
    """2 MLA + 2 dense MLP + 4 RMSNorm [M] + router [M, E+Z] (no bias) + E routed experts."""
    m = cfg.hidden_size
    return (2 * mla_params(m, cfg.mla) + 2 * mlp_params(m, cfg.ffn_hidden_size) + 4 * m
            + m * cfg.moe.num_router_outputs + cfg.moe.num_experts * expert_params(cfg))


def ngram_table_params(cfg: ModelConfig) -> int:
    """Hashed n-gram tables: table j has ratio*V + 2j + 1 rows (odd moduli) of width d."""
    n, d = cfg.ngram.num_tables, cfg.ngram_table_dim
    rows = cfg.ngram.vocab_size_ratio * cfg.vocab_size
    return sum((rows + 2 * j + 1) * d for j in range(n))


def ngram_projection_params(cfg: ModelConfig) -> int:
    """One [d, M] projection per n-gram table."""
    return cfg.ngram.num_tables * cfg.ngram_table_dim * cfg.hidden_size


def mtp_params(cfg: ModelConfig) -> int:
    """MTP head: embedding [V,M], enorm, hnorm, eh_proj [2M,M], input norm, MLA, post norm,
    dense MLP of width mtp_ffn, final norm (lm_head is shared with the backbone)."""
    if cfg.mtp_layers == 0:
        return 0
    m = cfg.hidden_size
    norms = 5 * m  # enorm, hnorm, input norm, post norm, final norm
    return (cfg.vocab_size * m + norms + 2 * m * m + mla_params(m, cfg.mla)
            + mlp_params(m, cfg.mtp_ffn))


def _human(n: int) -> str:
    """3 decimals in the largest unit of B, M, K that keeps the number >= 1."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)
