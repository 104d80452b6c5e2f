"""`python -m lcjax.convert`: hf-to-lcjax / lcjax-to-hf round trips and the per-layer compare report."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch

import lcjax.convert.compare as compare_module
from lcjax.convert import load_hf_checkpoint, load_lcjax_checkpoint
from lcjax.convert.__main__ import main
from lcjax.convert.compare import compare_with_transformers, format_rows
from lcjax.convert.hf_names import transformers_wants_zero_expert_stubs

from .conftest import read_tensors


def _assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for key, (array, dtype) in a.items():
        assert b[key][1] == dtype, key
        np.testing.assert_array_equal(b[key][0], array, err_msg=key)


@pytest.fixture(scope="module")
def converted(hub_checkpoint, tmp_path_factory):
    """hf-to-lcjax of the Hub checkpoint, then lcjax-to-hf in small shards (stubs: auto)."""
    src, _ = hub_checkpoint
    root = tmp_path_factory.mktemp("cli")
    assert main(["hf-to-lcjax", str(src), str(root / "lcjax")]) == 0
    assert main(["lcjax-to-hf", str(root / "lcjax"), str(root / "hf"), "--max-shard-size", "40KB"]) == 0
    return src, root


def test_hf_to_lcjax_writes_config_and_orbax_variables(converted, capsys):
    src, root = converted
    config, variables = load_lcjax_checkpoint(root / "lcjax")
    want_config, want = load_hf_checkpoint(src)
    assert config == want_config and config.model.mtp_layers == 1
    assert jax.tree.structure(variables) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, variables, want)


def test_lcjax_to_hf_round_trip_is_bit_exact_and_sharded(converted):
    src, root = converted
    index = json.loads((root / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 5
    written = read_tensors(root / "hf")
    stubs = {k for k in written if k not in read_tensors(src)}
    # Zero-expert stubs exactly when the installed transformers allocates them.
    assert bool(stubs) == transformers_wants_zero_expert_stubs()
    assert all(".experts.4." in k or ".experts.5." in k for k in stubs)
    _assert_same_tensors(read_tensors(src), {k: v for k, v in written.items() if k not in stubs})


def test_unrolled_layers_and_bfloat16_overrides(converted):
    src, root = converted
    main(["hf-to-lcjax", str(src), str(root / "unrolled"), "-o", "model.scan_layers=false",
          "-o", "model.param_dtype=bfloat16"])
    config, variables = load_lcjax_checkpoint(root / "unrolled")
    assert not config.model.scan_layers and "layers_1" in variables["params"]
    assert variables["params"]["layers_1"]["moe"]["gate"].dtype == jnp_bfloat16()
    main(["lcjax-to-hf", str(root / "unrolled"), str(root / "hf_bf16"), "--no-zero-expert-stubs"])
    written = read_tensors(root / "hf_bf16")
    for key, (array, dtype) in read_tensors(src).items():
        want = torch.as_tensor(array)
        if not key.endswith("e_score_correction_bias"):  # the correction bias stays float32
            want = want.bfloat16().view(torch.int16)
        assert written[key][1] == str(want.dtype if want.dtype != torch.int16 else torch.bfloat16)
        np.testing.assert_array_equal(written[key][0], want.numpy(), err_msg=key)


def jnp_bfloat16():
    import jax.numpy as jnp

    return jnp.bfloat16


def test_compare_reports_parity_layer_by_layer(converted, capsys):
    _, root = converted
    assert main(["compare", str(root / "hf"), "--seq-len", "12"]) == 0
    table = capsys.readouterr().out
    names = [line.split()[0] for line in table.splitlines()[1:]]
    assert names[:7] == ["embed", "layer_0/attn_0", "layer_0/mlp_0", "layer_0/moe", "layer_0/attn_1",
                         "layer_0/mlp_1", "layer_0"] and names[-2:] == ["final_norm", "logits"]
    logits_row = table.splitlines()[-1].split()
    assert float(logits_row[1]) < 1e-4 and float(logits_row[4]) < 1e-8  # max |diff|, mean KL


def test_compare_points_at_the_broken_sublayer(converted, monkeypatch):
    _, root = converted
    real = compare_module.load_hf_checkpoint

    def broken(path):
        config, variables = real(path)
        o = variables["params"]["layers"]["attn_1"]["o"]
        variables["params"]["layers"]["attn_1"]["o"] = o * np.array([1.0, 1.5])[:, None, None, None]
        return config, variables

    monkeypatch.setattr(compare_module, "load_hf_checkpoint", broken)
    rows = compare_with_transformers(root / "hf", seq_len=12)
    first_bad = next(r for r in rows if r.local > 1e-3)
    assert first_bad.name == "layer_1/attn_1"
    assert "layer_1/attn_1" in format_rows(rows)
    assert rows[-1].stream > 1e-3 and rows[-1].kl_mean > 0


def test_bfloat16_checkpoint_loads_exactly_and_round_trips(hub_checkpoint, tmp_path):
    """Hub checkpoints ship bfloat16: read without torch, widened exactly, written back bit-exact."""
    from lcjax.convert import hf_to_lcjax, lcjax_to_hf

    from .conftest import write_checkpoint

    src, _ = hub_checkpoint
    tensors = {k: torch.as_tensor(v).bfloat16() if "correction_bias" not in k else torch.as_tensor(v)
               for k, (v, _) in read_tensors(src).items()}
    config = json.loads((src / "config.json").read_text())
    bf16 = write_checkpoint(tmp_path / "bf16", tensors, config, shards=2)
    _, variables = load_hf_checkpoint(bf16)
    gate = variables["params"]["layers"]["moe"]["gate"]  # [L, E, M, F] float32
    want = tensors["model.layers.1.mlp.experts.3.gate_proj.weight"].float().numpy().T
    assert gate.dtype == np.float32
    np.testing.assert_array_equal(gate[1, 3], want)
    hf_to_lcjax(bf16, tmp_path / "lc")
    lcjax_to_hf(tmp_path / "lc", tmp_path / "out", dtype="bfloat16", zero_expert_stubs=False)
    _assert_same_tensors(read_tensors(bf16), read_tensors(tmp_path / "out"))


def test_zero_expert_stubs_setting():
    from lcjax.convert.hf_names import resolve_zero_expert_stubs

    assert resolve_zero_expert_stubs(None) == transformers_wants_zero_expert_stubs()
    assert resolve_zero_expert_stubs(True) is True and resolve_zero_expert_stubs(False) is False
    # ValueError naming the value; under the test suite's runtime type checks, a TypeError first.
    with pytest.raises((ValueError, TypeError), match="zero_expert_stubs"):
        resolve_zero_expert_stubs("yes")
