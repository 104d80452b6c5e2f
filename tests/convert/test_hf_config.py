"""config.json <-> ModelConfig: transformers 5.x fields, remote-code fields and their aliases."""

import dataclasses

import pytest
from transformers import LongcatFlashConfig

from lcjax.config_io import load_config, resolve_config_path
from lcjax.convert import hf_config_dict, model_config_from_hf

from .conftest import hf_config


def _runtime_free(cfg):
    return dataclasses.replace(cfg, param_dtype="float32", dtype="float32")


@pytest.mark.parametrize("preset", ["tiny", "longcat_flash", "longcat_flash_lite", "longcat_flash_zigzag"])
def test_presets_round_trip_through_config_json(preset):
    cfg = load_config(resolve_config_path(preset)).model
    hf = hf_config_dict(cfg)
    back = model_config_from_hf(hf, has_mtp=cfg.mtp_layers == 1, mtp_ffn_size=cfg.mtp_ffn)
    assert back == _runtime_free(cfg)


def test_transformers_reads_our_config_json():
    cfg = load_config(resolve_config_path("longcat_flash_zigzag")).model  # YaRN rope
    ours = hf_config_dict(cfg)
    theirs = LongcatFlashConfig(**{k: v for k, v in ours.items() if k != "model_type"})
    assert theirs.num_hidden_layers == 2 * cfg.num_layers
    assert theirs.rope_parameters["rope_type"] == "yarn"
    assert theirs.rope_parameters["mscale_all_dim"] == cfg.mla.rope.mscale_all_dim
    assert (theirs.n_routed_experts, theirs.zero_expert_num, theirs.moe_topk) == (512, 256, 12)


def test_transformers_5_config_maps_every_field():
    hf = hf_config().to_dict()
    cfg = model_config_from_hf(hf)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.ffn_hidden_size) == (99, 64, 2, 96)
    assert (cfg.moe.num_experts, cfg.moe.num_zero_experts, cfg.moe.top_k) == (4, 2, 2)
    assert cfg.moe.routed_scaling_factor == 6.0 and cfg.moe.expert_ffn_size == 32
    assert cfg.mla.rope.theta == 10000.0 and cfg.mla.latent_norm_eps == 1e-6
    assert cfg.mtp_layers == 0 and not cfg.ngram.enabled and not any(cfg.sparse_layers)


def test_remote_code_config_with_aliases():
    """Hub remote-code style: num_hidden_layers (logical), rope_theta + rope_scaling, oe_* fields."""
    hf = {
        "model_type": "longcat_flash_ngram", "vocab_size": 1000, "hidden_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "intermediate_size": 64,
        "moe_intermediate_size": 16, "num_local_experts": 8, "zero_expert_num": 4,
        "num_experts_per_tok": 3, "routed_scaling_factor": 6.0, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "eos_token_id": [2, 7], "pad_token_id": None, "rope_theta": 5e6,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
        "mla_scale_q_lora": True, "mla_scale_kv_lora": False, "zero_expert_type": "drop",
        "oe_vocab_size_ratio": 78, "oe_neighbor_num": 4, "oe_split_num": 2,
        "streaming_sparse_attention": {"sink_size": 128, "recent_size": 896, "sparsity": 0.5,
                                       "layer_type": "010101"},
    }
    cfg = model_config_from_hf(hf, num_layers=3, has_mtp=True, mtp_ffn_size=48)
    assert cfg.num_layers == 3 and cfg.ffn_hidden_size == 64 and cfg.moe.expert_ffn_size == 16
    assert (cfg.eos_token_id, cfg.pad_token_id) == (2, 0)
    assert cfg.mla.rope.type == "yarn" and cfg.mla.rope.theta == 5e6 and cfg.mla.rope.factor == 4.0
    assert not cfg.mla.scale_kv_lora and cfg.moe.zero_expert_type == "drop"
    assert cfg.ngram.enabled and (cfg.ngram.vocab_size_ratio, cfg.ngram.neighbor_num,
                                  cfg.ngram.split_num) == (78, 4, 2)
    assert (cfg.loza.sink_blocks, cfg.loza.local_blocks, cfg.loza.block_size) == (1, 7, 128)
    assert cfg.sparse_layers == (False, True) * 3
    assert cfg.mtp_layers == 1 and cfg.mtp_ffn == 48


@pytest.mark.parametrize("field, value", [
    ("attention_bias", True), ("router_bias", True), ("norm_topk_prob", True),
    ("tie_word_embeddings", True), ("num_key_value_heads", 2), ("qk_head_dim", 16),
    ("num_nextn_predict_layers", 2), ("nextn_use_scmoe", True),
])
def test_unsupported_values_name_the_field(field, value):
    hf = {**hf_config().to_dict(), field: value}
    with pytest.raises(ValueError, match=f"config.json: {field}={value!r} is not supported"):
        model_config_from_hf(hf)


def test_latent_eps_transformers_cannot_express_is_refused():
    cfg = load_config(resolve_config_path("tiny"), ["model.mla.latent_norm_eps=1e-5"]).model
    with pytest.raises(ValueError, match="model.mla.latent_norm_eps"):
        hf_config_dict(cfg)
