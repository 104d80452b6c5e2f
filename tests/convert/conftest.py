"""Tiny transformers LongcatFlash models and Hub-layout checkpoints written independently of lcjax.

`hub_tensors` re-derives the Hub layout (one tensor per routed expert, spec §1.5) from the
in-memory transformers model, so loader tests do not trust lcjax's own writer.
"""

import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

torch.set_num_threads(1)  # tiny models: a second thread only contends with XLA

TINY = dict(  # spec §2 tiny kwargs, two logical layers, scaling 6.0
    vocab_size=99, hidden_size=64, ffn_hidden_size=96, expert_ffn_hidden_size=32, num_layers=2,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, head_dim=4, v_head_dim=8, n_routed_experts=4,
    zero_expert_num=2, moe_topk=2, routed_scaling_factor=6.0, max_position_embeddings=128,
    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def hf_config(**overrides) -> LongcatFlashConfig:
    config = LongcatFlashConfig(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    return config


def make_hf_model(config: LongcatFlashConfig, seed: int) -> LongcatFlashForCausalLM:
    """Random model with what HF's init leaves trivial made random: router bias, norm weights.

    The zero-expert rows of the fused gate_up_proj (never used) are zeroed, as lcjax writes them.
    """
    torch.manual_seed(seed)
    model = LongcatFlashForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
        for layer in model.model.layers:
            layer.mlp.router.e_score_correction_bias.normal_(0.0, 0.1)
            if hasattr(layer.mlp.experts, "gate_up_proj"):  # transformers >= 5 (fused experts)
                layer.mlp.experts.gate_up_proj[config.n_routed_experts:].zero_()
    return model


def hub_tensors(model: LongcatFlashForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights in the Hub layout: per-expert gate/up/down, routed experts only.

    transformers 5 fuses the experts in memory ([E+Z, 2F, M] gate_up_proj); 4.57 already keeps
    the Hub names, which pass through unchanged.
    """
    cfg = model.config
    out = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition("experts.")
        if leaf == "gate_up_proj":
            for e in range(cfg.n_routed_experts):
                gate, up = value[e].chunk(2, dim=0)
                out[f"{prefix}experts.{e}.gate_proj.weight"] = gate
                out[f"{prefix}experts.{e}.up_proj.weight"] = up
        elif leaf == "down_proj":
            for e in range(cfg.n_routed_experts):
                out[f"{prefix}experts.{e}.down_proj.weight"] = value[e]
        else:
            out[key] = value
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def mtp_tensors(config: LongcatFlashConfig, ffn: int, seed: int) -> dict[str, torch.Tensor]:
    """Synthetic `model.mtp.*` tensors (spec §1.6 names) with a dense width of `ffn`."""
    g = torch.Generator().manual_seed(seed)
    m, heads = config.hidden_size, config.num_attention_heads
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    layer = "model.mtp.layers.0."
    shapes = {
        "model.mtp.embed_tokens.weight": (config.vocab_size, m),
        layer + "eh_proj.weight": (m, 2 * m), layer + "enorm.m.weight": (m,),
        layer + "hnorm.m.weight": (m,), layer + "input_layernorm.weight": (m,),
        layer + "post_attention_layernorm.weight": (m,), "model.mtp.norm.weight": (m,),
        layer + "self_attn.q_a_proj.weight": (config.q_lora_rank, m),
        layer + "self_attn.q_a_layernorm.weight": (config.q_lora_rank,),
        layer + "self_attn.q_b_proj.weight": (heads * qk, config.q_lora_rank),
        layer + "self_attn.kv_a_proj_with_mqa.weight": (config.kv_lora_rank + config.qk_rope_head_dim, m),
        layer + "self_attn.kv_a_layernorm.weight": (config.kv_lora_rank,),
        layer + "self_attn.kv_b_proj.weight": (heads * (config.qk_nope_head_dim + config.v_head_dim),
                                               config.kv_lora_rank),
        layer + "self_attn.o_proj.weight": (m, heads * config.v_head_dim),
        layer + "transformer_layer.mlp.gate_proj.weight": (ffn, m),
        layer + "transformer_layer.mlp.up_proj.weight": (ffn, m),
        layer + "transformer_layer.mlp.down_proj.weight": (m, ffn),
    }
    return {k: (1.0 if len(s) == 1 else 0.0) + 0.2 * torch.randn(s, generator=g)
            for k, s in shapes.items()}


def write_checkpoint(directory: pathlib.Path, tensors: dict, config: dict, shards: int = 3) -> pathlib.Path:
    """config.json + `shards` safetensors files (+ index when more than one), Hub naming."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    keys = sorted(tensors)
    groups = [keys[i::shards] for i in range(shards)]
    names = (["model.safetensors"] if shards == 1 else
             [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)])
    weight_map = {}
    for name, group in zip(names, groups):
        save_file({k: tensors[k] for k in group}, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    if shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def read_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a HF directory as raw numpy (bfloat16 through torch)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = (t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy(), str(t.dtype))
    return out


def hf_config_json(config: LongcatFlashConfig, **extra) -> dict:
    data = config.to_dict()
    data.update(extra)
    return data


@pytest.fixture(scope="session")
def hub_checkpoint(tmp_path_factory):
    """A 2-layer Hub-layout checkpoint (3 shards + index) with MTP, and its transformers model."""
    config = hf_config()
    model = make_hf_model(config, seed=11)
    tensors = {**hub_tensors(model), **mtp_tensors(config, ffn=80, seed=12)}
    path = write_checkpoint(tmp_path_factory.mktemp("hub"), tensors,
                            hf_config_json(config, num_nextn_predict_layers=1))
    return path, model
