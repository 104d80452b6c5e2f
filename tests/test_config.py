"""Config loading: every preset through the real loader, overrides, errors that name the key."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from lcjax.config import Config, LozaConfig, ModelConfig
from lcjax.config_io import (PRESET_DIR, REPO_ROOT, config_to_dict, dump_config, load_config,
                             resolve_config_path)

CONFIG_FILES = sorted(p for p in (REPO_ROOT / "configs").rglob("*.y*ml")
                      if "rules" not in p.parts  # rule tables: tests/parallel/test_sharding_plan.py
                      and "rl" not in p.parts)  # RL run configs: tests/rl/test_config_rl.py
PRESETS = {p.stem: p for p in PRESET_DIR.glob("*.yaml")}


def test_presets_exist():
    assert {"longcat_flash", "longcat_flash_lite", "longcat_flash_zigzag", "small",
            "tiny"} <= set(PRESETS)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_yaml_loads_and_round_trips(path: pathlib.Path, tmp_path: pathlib.Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    out = tmp_path / "dumped.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    assert config_to_dict(load_config(out)) == config_to_dict(cfg)


def test_none_path_gives_defaults():
    assert load_config(None) == Config()


def test_longcat_flash_matches_published_dims_and_defaults():
    cfg = load_config(PRESETS["longcat_flash"]).model
    assert cfg == ModelConfig()  # the dataclass defaults describe LongCat-Flash
    assert (cfg.hidden_size, cfg.num_layers, cfg.mla.num_heads, cfg.moe.num_router_outputs) == (
        6144, 28, 64, 768)
    assert cfg.mla.rope.theta == 1e7 and cfg.mla.rope.type == "default"


def test_zigzag_is_flash_plus_loza_and_yarn():
    flash = load_config(PRESETS["longcat_flash"]).model
    zz = load_config(PRESETS["longcat_flash_zigzag"]).model
    assert len(zz.loza.layer_pattern) == 56 and sum(zz.sparse_layers) == 28
    assert zz.loza == LozaConfig(layer_pattern="01" * 28, block_size=128, sink_blocks=1,
                                 local_blocks=7)
    rope = zz.mla.rope
    assert (rope.type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 8.0, 131072)
    assert (rope.mscale, rope.mscale_all_dim) == (1.0, 1.0)
    assert zz.max_position_embeddings == 1048576
    unchanged = dataclasses.replace(zz, loza=flash.loza, max_position_embeddings=131072,
                                    mla=dataclasses.replace(zz.mla, rope=flash.mla.rope))
    assert unchanged == flash


def test_lite_dims():
    cfg = load_config(PRESETS["longcat_flash_lite"]).model
    assert (cfg.hidden_size, cfg.num_layers, cfg.mla.num_heads, cfg.ffn_hidden_size) == (
        3072, 14, 32, 6144)
    assert (cfg.moe.num_experts, cfg.moe.num_zero_experts, cfg.moe.top_k) == (256, 128, 12)
    assert cfg.ngram.enabled and cfg.ngram.num_tables == 12 and cfg.ngram_table_dim == 256
    assert cfg.mla.rope.theta == 5e6 and cfg.mla.rope.type == "default"
    assert cfg.max_position_embeddings == 327680


def test_small_is_the_baselines_shape():
    cfg = load_config(PRESETS["small"]).model
    mla, moe = cfg.mla, cfg.moe
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.ffn_hidden_size) == (
        32768, 1024, 8, 2816)
    assert (mla.num_heads, mla.q_lora_rank, mla.kv_lora_rank) == (16, 384, 128)
    assert (mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) == (64, 32, 64)
    assert (moe.num_experts, moe.expert_ffn_size, moe.num_zero_experts, moe.top_k) == (
        64, 512, 32, 6)
    assert moe.routed_scaling_factor == 6.0 and mla.rope.theta == 10000.0
    assert cfg.max_position_embeddings == 4096


def test_tiny_exercises_every_path():
    cfg = load_config(PRESETS["tiny"]).model
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.mla.num_heads) == (256, 48, 2, 4)
    assert cfg.ngram.enabled and cfg.ngram.num_tables == 4 and cfg.ngram_table_dim == 12
    assert cfg.sparse_layers == (False, True, True, False)
    assert cfg.moe.num_zero_experts > 0 and cfg.mtp_layers == 1
    assert (cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id, cfg.rms_norm_eps) == (
        2, 1, 0, 1e-6)


# ---------------------------------------------------------------- overrides


def test_overrides_of_every_type():
    cfg = load_config(PRESETS["tiny"], [
        "model.num_layers=4",  # int
        "model.loza.layer_pattern=01100110",  # str that YAML would read as octal
        "model.moe.dispatch=dense",  # str
        "model.mla.rope.theta=1e7",  # PyYAML reads 1e7 as a string
        "model.rms_norm_eps=1",  # int into a float field
        "model.mla.scale_q_lora=false",  # bool
        "model.mtp_ffn_size=null",  # None into an Optional
        "runtime.seed=7",
        "mesh.data=2",
    ])
    m = cfg.model
    assert m.num_layers == 4 and m.loza.layer_pattern == "01100110"
    assert m.moe.dispatch == "dense"
    assert m.mla.rope.theta == 1e7 and isinstance(m.mla.rope.theta, float)
    assert m.rms_norm_eps == 1.0 and isinstance(m.rms_norm_eps, float)
    assert m.mla.scale_q_lora is False and m.mtp_ffn_size is None
    assert (cfg.runtime.seed, cfg.mesh.data) == (7, 2)
    assert m.hidden_size == 48  # untouched YAML values survive


@pytest.mark.parametrize("text, expected", [("128", 128), ("None", None), ("~", None)])
def test_optional_int_override(text: str, expected):
    assert load_config(None, [f"model.mtp_ffn_size={text}"]).model.mtp_ffn_size == expected


def test_quoted_and_empty_string_overrides():
    assert load_config(None, ['model.moe.dispatch="dense"']).model.moe.dispatch == "dense"
    cfg = load_config(PRESETS["tiny"], ["model.loza.layer_pattern="])
    assert cfg.model.loza.layer_pattern == ""


def test_later_override_wins_and_whole_tree_validates_once():
    # Each override alone breaks the pattern-length invariant; together they are valid.
    cfg = load_config(PRESETS["tiny"], ["model.num_layers=1", "model.loza.layer_pattern=10",
                                        "model.num_layers=1"])
    assert cfg.model.num_layers == 1 and cfg.model.sparse_layers == (True, False)


def test_yaml_float_strings_are_coerced(tmp_path: pathlib.Path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  rms_norm_eps: 1e-6\n  mla:\n    rope:\n      theta: 5e6\n")
    cfg = load_config(path)
    assert cfg.model.rms_norm_eps == 1e-6 and cfg.model.mla.rope.theta == 5e6


def test_empty_yaml_is_defaults(tmp_path: pathlib.Path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == Config()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("override, fragment", [
    ("model.num_layer=4", "did you mean 'model.num_layers'"),
    ("model.moe.topk=3", "did you mean 'model.moe.top_k'"),
    ("model.mla.rope.thetta=5", "did you mean 'model.mla.rope.theta'"),
    ("modle.num_layers=4", "did you mean 'model'"),
    ("model.top_k=3", "did you mean 'model.moe.top_k'"),  # right leaf, wrong section
    ("model.num_layers.x=3", "'model.num_layers' is not a section"),
])
def test_unknown_override_key_names_close_match(override: str, fragment: str):
    with pytest.raises(ValueError, match="unknown config key|is not a section") as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ValueError, match="valid keys here: .*model.moe.top_k"):
        load_config(None, ["model.moe.zzzzzz=1"])


def test_unknown_yaml_key_names_full_dotted_key(tmp_path: pathlib.Path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  mla:\n    num_head: 8\n")
    with pytest.raises(ValueError, match=r"'model\.mla\.num_head'.*'model\.mla\.num_heads'"):
        load_config(path)


@pytest.mark.parametrize("override", ["model.num_layers", "=3", "model.num_layers 4"])
def test_override_without_equals_is_rejected(override: str):
    with pytest.raises(ValueError, match="not of the form") as err:
        load_config(None, [override])
    assert repr(override) in str(err.value)


@pytest.mark.parametrize("override, fragment", [
    ("model.num_layers=true", "'model.num_layers' expects an integer, got True"),
    ("model.num_layers=four", "'model.num_layers' expects an integer, got 'four'"),
    ("model.num_layers=4.0", "'model.num_layers' expects an integer"),
    ("model.rms_norm_eps=small", "'model.rms_norm_eps' expects a number, got 'small'"),
    ("model.rms_norm_eps=true", "'model.rms_norm_eps' expects a number"),
    ("model.mla.scale_q_lora=1", "'model.mla.scale_q_lora' expects true or false"),
    ("model.moe=3", "'model.moe' is a section"),
    ("model.num_layers=[1, 2", "'model.num_layers': cannot parse"),
])
def test_bad_override_values_name_key_and_value(override: str, fragment: str):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_unquoted_yaml_pattern_is_rejected_with_hint(tmp_path: pathlib.Path):
    path = tmp_path / "octal.yaml"
    path.write_text("model:\n  num_layers: 2\n  loza:\n    layer_pattern: 0110\n")
    with pytest.raises(ValueError, match="'model.loza.layer_pattern' expects a string.*quote"):
        load_config(path)


@pytest.mark.parametrize("overrides, fragments", [
    (["model.moe.top_k=1000"], ["moe.top_k=1000", "model.moe"]),
    (["model.loza.layer_pattern=010"], ["model.loza.layer_pattern='010'", "56 characters"]),
    (["model.param_dtype=float8"], ["model.param_dtype='float8'", "bfloat16"]),
    (["model.moe.dispatch=sparse"], ["moe.dispatch='sparse'", "ragged"]),
    (["model.mla.rope.type=ntk"], ["rope.type='ntk'", "model.mla.rope"]),
    (["model.eos_token_id=999999999"], ["model.eos_token_id=999999999"]),
    (["mesh.data=-1", "mesh.fsdp=-1"], ["at most one axis"]),
])
def test_validation_errors_name_key_and_value(overrides, fragments):
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_yaml_top_level_must_be_mapping(tmp_path: pathlib.Path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config(path)


# ---------------------------------------------------------------- round trip and paths


def test_dump_round_trip_with_overrides(tmp_path: pathlib.Path):
    cfg = load_config(PRESETS["longcat_flash_zigzag"], ["model.mtp_ffn_size=4096",
                                                        "runtime.log_level=DEBUG"])
    out = tmp_path / "cfg.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    assert load_config(out).model.loza.layer_pattern == "01" * 28


def test_resolve_config_path():
    assert resolve_config_path("tiny") == PRESET_DIR / "tiny.yaml"
    assert resolve_config_path("tiny.yaml") == PRESET_DIR / "tiny.yaml"
    assert resolve_config_path(PRESETS["small"]) == PRESETS["small"]
    assert resolve_config_path("configs/models/small.yaml").is_file()
    with pytest.raises(ValueError, match="did you mean 'tiny'"):
        resolve_config_path("tinny")
    with pytest.raises(ValueError, match="neither a file nor a preset"):
        resolve_config_path("no/such/file.yaml")


def test_several_files_merge_in_order(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("model:\n  num_layers: 3\n  moe:\n    top_k: 2\n")
    second.write_text("model:\n  moe:\n    top_k: 4\n")
    cfg = load_config([first, second], ["model.hidden_size=96"])
    assert (cfg.model.num_layers, cfg.model.moe.top_k, cfg.model.hidden_size) == (3, 4, 96)


def test_attention_impl_defaults_to_the_platform_choice_and_names_bad_values():
    from lcjax.config import ModelConfig

    assert ModelConfig().attention_impl is None
    for name in ("xla", "reference", "cudnn", "splash", "pallas_tpu_interpret"):
        assert ModelConfig(attention_impl=name).attention_impl == name
    with pytest.raises(ValueError, match="model.attention_impl='flash'"):
        ModelConfig(attention_impl="flash")
