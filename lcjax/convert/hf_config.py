"""Hugging Face `config.json` <-> `ModelConfig`.

Reads transformers 5.x `LongcatFlashConfig` files and the Hub remote-code variants
(`zero_expert_type`, `mla_scale_*`, `rope_theta`/`rope_scaling`, Flash-Lite's n-gram fields and
their `oe_*` aliases, ZigZag's `streaming_sparse_attention`). Every value lcjax cannot represent
raises a ValueError naming the config.json field, so a checkpoint never loads into a model that
computes something else; so does a value of the wrong JSON type (`"hidden_size": "4096"`). Runtime settings (compute dtype, dispatch, scan) keep the lcjax defaults.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from lcjax.config import LozaConfig, MLAConfig, ModelConfig, MoEConfig, NgramConfig, RopeConfig

MODEL_TYPES = ("longcat_flash", "longcat_flash_ngram")
ARCHITECTURES = {"longcat_flash": "LongcatFlashForCausalLM",
                 "longcat_flash_ngram": "LongcatFlashNgramForCausalLM"}
_REQUIRED = object()
_HF_LATENT_EPS = 1e-6  # transformers builds q_a/kv_a_layernorm with the class default eps
_SSA_BLOCK = 128  # SGLang's fixed streaming-sparse-attention block size


def _find(hf: Mapping[str, Any], names: tuple[str, ...], default: Any, prefix: str) -> tuple[str, Any]:
    """(field name, value) of the first of `names` present in config.json (aliases)."""
    for name in names:
        if hf.get(name) is not None:
            return prefix + name, hf[name]
    if default is _REQUIRED:
        raise ValueError(f"config.json: required field {prefix + names[0]!r} is missing")
    return prefix + names[0], default


def _get(hf: Mapping[str, Any], *names: str, default: Any = _REQUIRED) -> Any:
    """The first of `names` present in config.json (aliases), else `default` or a ValueError."""
    return _find(hf, names, default, "")[1]


def _int(hf: Mapping[str, Any], *names: str, default: Any = _REQUIRED, prefix: str = "") -> int:
    """An integer field: a JSON number with no fraction (not a string, not a bool)."""
    field, value = _find(hf, names, default, prefix)
    if isinstance(value, bool) or not (isinstance(value, int)
                                       or isinstance(value, float) and value.is_integer()):
        raise ValueError(f"config.json: field {field!r} = {value!r} is not an integer")
    return int(value)


def _float(hf: Mapping[str, Any], *names: str, default: Any = _REQUIRED, prefix: str = "") -> float:
    """A real-valued field: a JSON number (not a string, not a bool)."""
    field, value = _find(hf, names, default, prefix)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.json: field {field!r} = {value!r} is not a number")
    return float(value)


def _bool(hf: Mapping[str, Any], name: str, default: bool) -> bool:
    """A JSON true/false field ("false" as a string would otherwise read as True)."""
    field, value = _find(hf, (name,), default, "")
    if not isinstance(value, bool):
        raise ValueError(f"config.json: field {field!r} = {value!r} is not true or false")
    return value


def _str(hf: Mapping[str, Any], name: str, default: str, prefix: str = "") -> str:
    field, value = _find(hf, (name,), default, prefix)
    if not isinstance(value, str):
        raise ValueError(f"config.json: field {field!r} = {value!r} is not a string")
    return value


def _dict(hf: Mapping[str, Any], name: str) -> dict:
    """An optional object field ({} when absent)."""
    value = hf.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"config.json: field {name!r} = {value!r} is not an object")
    return dict(value)


def _require(cond: bool, field: str, value: Any, expected: str) -> None:
    if not cond:
        raise ValueError(f"config.json: {field}={value!r} is not supported: expected {expected}")


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    """RoPE from 5.x `rope_parameters` or remote-code `rope_theta` + `rope_scaling`."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = _dict(hf, field)
    theta = (_float(params, "rope_theta", prefix=f"{field}.") if params.get("rope_theta") is not None
             else _float(hf, "rope_theta", default=1e7))  # HF default_theta = 1e7
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return RopeConfig(theta=theta)
    _require(rope_type in ("yarn", "deepseek_yarn"), f"{field}.rope_type", rope_type,
             "'default', 'yarn' or 'deepseek_yarn'")
    _require(params.get("attention_factor") is None, f"{field}.attention_factor",
             params.get("attention_factor"), "absent (derived from factor and mscale)")
    _require(params.get("truncate", True) is True, f"{field}.truncate", params.get("truncate"),
             "true (lcjax rounds the YaRN correction range)")
    _require(params.get("partial_rotary_factor", 1.0) == 1.0, f"{field}.partial_rotary_factor",
             params.get("partial_rotary_factor"), "1.0")
    prefix = f"{field}."

    def number(name: str, default: float) -> float:  # 0 or absent: the default, as HF does
        return _float(params, name, default=default, prefix=prefix) or default

    original = _int(params, "original_max_position_embeddings", prefix=prefix)
    # factor absent: HF uses the ratio of the context lengths
    factor = (_float(params, "factor", prefix=prefix) if params.get("factor") is not None
              else _int(hf, "max_position_embeddings") / original)
    return RopeConfig(theta=theta, type="yarn", factor=factor,
                      original_max_position_embeddings=original,
                      beta_fast=number("beta_fast", 32.0), beta_slow=number("beta_slow", 1.0),
                      mscale=number("mscale", 0.0), mscale_all_dim=number("mscale_all_dim", 0.0))


def _loza_from_hf(hf: Mapping[str, Any]) -> LozaConfig:
    """ZigZag: blocks = ceil(size / 128) as in SGLang; `layer_type` has one bit per sublayer."""
    ssa = _dict(hf, "streaming_sparse_attention")
    if not ssa:
        return LozaConfig()
    prefix = "streaming_sparse_attention."
    block = _int(ssa, "block_size", default=_SSA_BLOCK, prefix=prefix)
    return LozaConfig(layer_pattern=_str(ssa, "layer_type", "", prefix=prefix), block_size=block,
                      sink_blocks=math.ceil(_int(ssa, "sink_size", default=128, prefix=prefix) / block),
                      local_blocks=math.ceil(_int(ssa, "recent_size", default=256, prefix=prefix) / block))


def _ngram_from_hf(hf: Mapping[str, Any], model_type: str) -> NgramConfig:
    if model_type != "longcat_flash_ngram":
        return NgramConfig()
    return NgramConfig(enabled=True,
                       vocab_size_ratio=_int(hf, "ngram_vocab_size_ratio", "oe_vocab_size_ratio"),
                       neighbor_num=_int(hf, "emb_neighbor_num", "oe_neighbor_num"),
                       split_num=_int(hf, "emb_split_num", "oe_split_num"))


def _check_unsupported(hf: Mapping[str, Any], heads: int, rope_dim: int, qk_dim: int) -> None:
    """Fields whose non-default values change the computation in ways lcjax does not model."""
    checks = [
        ("hidden_act", "silu", "'silu'"),
        ("attention_bias", False, "false"),
        ("router_bias", False, "false"),
        ("norm_topk_prob", False, "false (weights are not renormalised)"),
        ("tie_word_embeddings", False, "false (untied lm_head)"),
        ("nextn_use_scmoe", False, "false (dense MTP block)"),
        ("attention_method", "MLA", "'MLA'"),
        ("num_key_value_heads", heads, f"num_attention_heads={heads} (MLA)"),
        ("head_dim", rope_dim, f"qk_rope_head_dim={rope_dim} (the RoPE dim)"),
        ("qk_head_dim", qk_dim, f"qk_nope_head_dim + qk_rope_head_dim = {qk_dim}"),
    ]
    for field, want, expected in checks:
        if hf.get(field) is not None:
            _require(hf[field] == want, field, hf[field], expected)
    mtp = hf.get("num_nextn_predict_layers")
    _require(mtp is None or mtp in (0, 1), "num_nextn_predict_layers", mtp, "0 or 1")


def model_config_from_hf(hf: Mapping[str, Any], *, num_layers: Optional[int] = None,
                         has_mtp: bool = False, mtp_ffn_size: Optional[int] = None) -> ModelConfig:
    """Build the lcjax ModelConfig described by a parsed config.json.

    Args:
      hf: the parsed config.json.
      num_layers: logical layers found in the weights; used only when config.json has no
        `num_layers` (remote code writes `num_hidden_layers`, whose meaning changed in 5.x).
      has_mtp: whether the checkpoint holds `model.mtp.*` tensors (HF drops them; the Hub ships them).
      mtp_ffn_size: the MTP dense width read from its weights (None = ffn_hidden_size).
    """
    model_type = hf.get("model_type")
    _require(model_type in MODEL_TYPES, "model_type", model_type, f"one of {list(MODEL_TYPES)}")
    heads = _int(hf, "num_attention_heads")
    rope_dim, nope = _int(hf, "qk_rope_head_dim"), _int(hf, "qk_nope_head_dim")
    _check_unsupported(hf, heads, rope_dim, nope + rope_dim)
    _require(hf.get("q_lora_rank") is not None, "q_lora_rank", None, "an integer (LoRA queries)")
    _require(hf.get("num_layers", num_layers) is not None, "num_layers", None,
             "an integer (or layers in the weights)")
    layers = _int(hf, "num_layers", default=num_layers)
    eos = _get(hf, "eos_token_id", default=2)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos  # n-gram segments end at the first
    mla = MLAConfig(num_heads=heads, q_lora_rank=_int(hf, "q_lora_rank"),
                    kv_lora_rank=_int(hf, "kv_lora_rank"), qk_nope_head_dim=nope,
                    qk_rope_head_dim=rope_dim, v_head_dim=_int(hf, "v_head_dim"),
                    latent_norm_eps=_HF_LATENT_EPS,
                    scale_q_lora=_bool(hf, "mla_scale_q_lora", True),
                    scale_kv_lora=_bool(hf, "mla_scale_kv_lora", True),
                    rope=_rope_from_hf(hf))
    moe = MoEConfig(num_experts=_int(hf, "n_routed_experts", "num_local_experts"),
                    num_zero_experts=_int(hf, "zero_expert_num", default=0),
                    top_k=_int(hf, "moe_topk", "num_experts_per_tok"),
                    expert_ffn_size=_int(hf, "expert_ffn_hidden_size", "moe_intermediate_size"),
                    routed_scaling_factor=_float(hf, "routed_scaling_factor", default=1.0),
                    zero_expert_type=_str(hf, "zero_expert_type", "identity"))
    ffn = _int(hf, "ffn_hidden_size", "intermediate_size")
    return ModelConfig(
        vocab_size=_int(hf, "vocab_size"), hidden_size=_int(hf, "hidden_size"),
        num_layers=layers, ffn_hidden_size=ffn,
        rms_norm_eps=_float(hf, "rms_norm_eps", default=1e-5),
        max_position_embeddings=_int(hf, "max_position_embeddings"),
        bos_token_id=_int(hf, "bos_token_id", default=1),
        eos_token_id=_int({"eos_token_id": eos}, "eos_token_id"),
        pad_token_id=_int(hf, "pad_token_id", default=0), mla=mla, moe=moe,
        ngram=_ngram_from_hf(hf, model_type), loza=_loza_from_hf(hf),
        mtp_layers=1 if has_mtp else 0,
        mtp_ffn_size=None if mtp_ffn_size in (None, ffn) else int(mtp_ffn_size))


def _rope_to_hf(rope: RopeConfig) -> dict:
    if rope.type == "default":
        return {"rope_type": "default", "rope_theta": rope.theta}
    return {"rope_type": "yarn", "rope_theta": rope.theta, "factor": rope.factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
            "beta_fast": rope.beta_fast, "beta_slow": rope.beta_slow,
            "mscale": rope.mscale, "mscale_all_dim": rope.mscale_all_dim}


def hf_config_dict(cfg: ModelConfig) -> dict:
    """config.json for `cfg`: transformers 5.x fields plus the Hub remote-code fields.

    Raises ValueError for settings transformers cannot express (the MLA latent norm eps).
    """
    a, moe = cfg.mla, cfg.moe
    if a.latent_norm_eps != _HF_LATENT_EPS:
        raise ValueError(f"model.mla.latent_norm_eps={a.latent_norm_eps!r} cannot be saved: "
                         f"transformers fixes the MLA latent norm eps at {_HF_LATENT_EPS}")
    model_type = MODEL_TYPES[1] if cfg.ngram.enabled else MODEL_TYPES[0]
    rope = _rope_to_hf(a.rope)
    out = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_heads,
        "q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank,
        "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
        "head_dim": a.qk_rope_head_dim, "qk_head_dim": a.qk_head_dim, "v_head_dim": a.v_head_dim,
        "ffn_hidden_size": cfg.ffn_hidden_size, "expert_ffn_hidden_size": moe.expert_ffn_size,
        "n_routed_experts": moe.num_experts, "zero_expert_num": moe.num_zero_experts,
        "moe_topk": moe.top_k, "routed_scaling_factor": moe.routed_scaling_factor,
        "zero_expert_type": moe.zero_expert_type, "router_bias": False, "norm_topk_prob": False,
        "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "tie_word_embeddings": False, "attention_bias": False,
        "rope_parameters": rope, "rope_theta": a.rope.theta,
        "mla_scale_q_lora": a.scale_q_lora, "mla_scale_kv_lora": a.scale_kv_lora,
        "attention_method": "MLA", "router_dtype": "float32",
        "num_nextn_predict_layers": cfg.mtp_layers, "dtype": cfg.param_dtype,
    }
    if cfg.ngram.enabled:
        out.update(ngram_vocab_size_ratio=cfg.ngram.vocab_size_ratio,
                   emb_neighbor_num=cfg.ngram.neighbor_num, emb_split_num=cfg.ngram.split_num)
    if any(cfg.sparse_layers):
        loza = cfg.loza
        out["streaming_sparse_attention"] = {
            "sink_size": loza.sink_blocks * loza.block_size,
            "recent_size": loza.local_blocks * loza.block_size,
            "sparsity": sum(cfg.sparse_layers) / len(cfg.sparse_layers),
            "layer_type": loza.layer_pattern, "block_size": loza.block_size}
    return out
