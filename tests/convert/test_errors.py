"""Wrong or partial checkpoints fail with errors naming the tensor or field; DST stays untouched."""

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lcjax.convert import hf_to_lcjax, lcjax_to_hf, load_hf_checkpoint, save_hf_checkpoint


@pytest.fixture
def broken(hub_checkpoint, tmp_path):
    """A writable copy of the Hub checkpoint and a helper that edits one of its shards."""
    src = tmp_path / "src"
    shutil.copytree(hub_checkpoint[0], src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]

    def edit(key, fn):
        shard = src / index[key]
        tensors = load_file(shard)
        tensors = fn(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})

    return src, edit


def _assert_nothing_written(dst):
    assert not dst.exists()
    leftovers = [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
    assert leftovers == []  # the temporary directory is removed too


KEY = "model.layers.1.mlps.0.up_proj.weight"


def test_missing_tensor_is_named_and_dst_untouched(broken, tmp_path):
    src, edit = broken
    edit(KEY, lambda t: {k: v for k, v in t.items() if k != KEY})
    with pytest.raises(ValueError, match=f"missing tensor '{KEY}'"):
        hf_to_lcjax(src, tmp_path / "dst")
    _assert_nothing_written(tmp_path / "dst")


def test_shape_mismatch_is_named(broken, tmp_path):
    src, edit = broken
    edit(KEY, lambda t: {**t, KEY: t[KEY][:-1]})
    with pytest.raises(ValueError, match=rf"tensor '{KEY}' has shape \[95, 64\], expected \[96, 64\]"):
        load_hf_checkpoint(src)
    with pytest.raises(ValueError, match=KEY):
        hf_to_lcjax(src, tmp_path / "dst")
    _assert_nothing_written(tmp_path / "dst")


def test_unexpected_tensor_is_named(broken):
    src, edit = broken
    extra = "model.layers.0.self_attn.0.q_a_proj.weight_scale_inv"  # e.g. an FP8 checkpoint
    edit(KEY, lambda t: {**t, extra: np.ones((1, 1), np.float32)})
    with pytest.raises(ValueError, match=f"unexpected tensor '{extra}'"):
        load_hf_checkpoint(src)


@pytest.mark.parametrize("field, value, match", [
    ("model_type", "llama", r"model_type='llama' is not supported"),
    ("hidden_act", "gelu", r"hidden_act='gelu' is not supported"),
    ("head_dim", 8, r"head_dim=8 is not supported: expected qk_rope_head_dim=4"),
    ("hidden_size", None, r"required field 'hidden_size' is missing"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0}, r"rope_parameters.rope_type='linear'"),
])
def test_bad_config_fields_are_named(broken, tmp_path, field, value, match):
    src, _ = broken
    config = json.loads((src / "config.json").read_text())
    if value is None:
        del config[field]
    else:
        config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        hf_to_lcjax(src, tmp_path / "dst")
    _assert_nothing_written(tmp_path / "dst")


def test_existing_dst_is_refused_then_replaced_with_overwrite(hub_checkpoint, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        hf_to_lcjax(hub_checkpoint[0], dst)
    assert (dst / "keep.txt").read_text() == "mine"
    hf_to_lcjax(hub_checkpoint[0], dst, overwrite=True)
    assert (dst / "config.yaml").is_file() and not (dst / "keep.txt").exists()
    _assert_nothing_written(tmp_path / "never")


def test_failure_while_writing_leaves_no_output(hub_checkpoint, tmp_path):
    """A bad variable late in the stream: shards were already written in the temp dir."""
    config, variables = load_hf_checkpoint(hub_checkpoint[0])
    variables["router_bias"]["layers"]["moe"]["e_score_correction_bias"] = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match=r"router_bias/layers/moe/e_score_correction_bias has shape \[2, 5\]"):
        save_hf_checkpoint(variables, config, tmp_path / "out", max_shard_size="20KB")
    _assert_nothing_written(tmp_path / "out")
    del variables["params"]["lm_head"]
    with pytest.raises(ValueError, match="variables have no 'params/lm_head'"):
        save_hf_checkpoint(variables, config, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_not_an_lcjax_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is not an lcjax checkpoint"):
        lcjax_to_hf(tmp_path, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


# ---------------------------------------------------------------- parse errors name file and field


def _rewrite_header(shard, header_bytes):
    """Replace a safetensors file's header (keeps the 8-byte length prefix consistent)."""
    import struct

    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    shard.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data[8 + length:])


@pytest.mark.parametrize("header, match", [
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]', r"safetensors header \(\d+ bytes\) is not valid JSON"),
    (b'[1, 2, 3]', r"safetensors header is a JSON list, expected an object"),
    (b'{"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}', r"tensor 'w': field 'shape' = '2' is not a list"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}', r"tensor 'w': field 'data_offsets' = \[8\]"),
])
def test_garbled_safetensors_header_names_the_file(broken, tmp_path, header, match):
    src, _ = broken
    shard = sorted(src.glob("*.safetensors"))[1]
    _rewrite_header(shard, header)
    with pytest.raises(ValueError, match=f"{shard.name}: {match}"):
        hf_to_lcjax(src, tmp_path / "dst")
    _assert_nothing_written(tmp_path / "dst")


def test_garbled_index_names_the_file(broken, tmp_path):
    src, _ = broken
    (src / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: field 'weight_map' = \['a'\]"):
        hf_to_lcjax(src, tmp_path / "dst")
    (src / "model.safetensors.index.json").write_text('{"weight_map": {')
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: not valid JSON"):
        hf_to_lcjax(src, tmp_path / "dst")


@pytest.mark.parametrize("text, match", [
    ('[{"hidden_size": 64}]', r"config.json: expected a JSON object of fields, got a list"),
    ('{"hidden_size": 64,', r"config.json: not valid JSON"),
])
def test_config_json_that_is_not_an_object(broken, tmp_path, text, match):
    src, _ = broken
    (src / "config.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(src)) + "/" + match):
        hf_to_lcjax(src, tmp_path / "dst")
    _assert_nothing_written(tmp_path / "dst")


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", "64", "field 'hidden_size' = '64' is not an integer"),
    ("num_attention_heads", 4.5, "field 'num_attention_heads' = 4.5 is not an integer"),
    ("moe_topk", True, "field 'moe_topk' = True is not an integer"),
    ("rms_norm_eps", "1e-6", "field 'rms_norm_eps' = '1e-6' is not a number"),
    ("mla_scale_q_lora", "false", "field 'mla_scale_q_lora' = 'false' is not true or false"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": "1e4"},
     "field 'rope_parameters.rope_theta' = '1e4' is not a number"),
])
def test_config_json_field_of_the_wrong_type(broken, tmp_path, field, value, message):
    src, _ = broken
    config = json.loads((src / "config.json").read_text())
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"{src / 'config.json'}: {message}")):
        hf_to_lcjax(src, tmp_path / "dst")
    _assert_nothing_written(tmp_path / "dst")
