"""Quantized tiny LongCat: every recipe runs, W8A8 stays close to float, cached decode equals
the full forward, orbax round trip, serve engine, and the refused combinations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lcjax.model import decode_step, prefill
from lcjax.quant import QTensor, load_quantized, quantize_model, save_quantized
from lcjax.quant.calibrate import calibrate
from lcjax.quant.apply import quantized_paths
from tests.model.conftest import init_variables, jitted_apply, tiny_config

GROUPED = "group_size=8"  # divides every contraction dim of tiny (48, 24, 16, 32, 64)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    variables = init_variables(cfg)
    rng = np.random.default_rng(0)
    calib = [rng.integers(3, cfg.vocab_size, (4, 32), dtype=np.int32) for _ in range(2)]
    ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 40), dtype=np.int32))
    return cfg, variables, calib, ids, jitted_apply(cfg)(variables, ids)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("recipe,tol", [
    ("w8a8", 0.03), ("w8a8_smoothquant", 0.03), (f"fptq_w4a8:{GROUPED}", 0.3),
    (f"w4a16:{GROUPED}", 0.3), ("odyssey_w4a8", 0.4), (f"naive_w4a8:{GROUPED}", 0.3),
])
def test_recipes_run_and_stay_close_to_float(tiny, recipe, tol):
    cfg, variables, calib, ids, ref = tiny
    q = quantize_model(variables, cfg, recipe, calib)
    flat = traverse_util.flatten_dict(q["params"])
    names = {"/".join(p) for p, leaf in flat.items() if isinstance(leaf, QTensor)}
    assert names == set(quantized_paths(variables["params"], cfg))
    assert {"layers/moe/gate", "layers/attn_0/q_a", "layers/attn_1/kv_b", "mtp/mlp/down",
            "mtp/attn/o"} <= names
    for float_name in ("layers/moe/classifier", "lm_head", "embed/tokens/embedding",
                       "mtp/eh_proj", "layers/input_norm_0/scale"):
        assert not isinstance(flat[tuple(float_name.split("/"))], QTensor), float_name
    out = jitted_apply(cfg)(q, ids)
    assert bool(jnp.all(jnp.isfinite(out)))
    assert 0 < _rel(out, ref) < tol


def test_quantized_decode_equals_quantized_forward(tiny):
    """Integer Scale W4A8 with all three FPTQ policies present (thresholds at the terciles of
    this model's ranges), through prefill and chunked cached decode."""
    cfg, variables, calib, ids, _ = tiny
    stats = calibrate(cfg, variables, calib)
    v = np.sort([float(s["absmax"].max()) for s in stats.values()])
    v0, v1 = v[len(v) // 3], v[2 * len(v) // 3]
    q, report = quantize_model(variables, cfg, f"w4a8_integer_scale:{GROUPED},v0={v0},v1={v1}",
                               stats=stats, return_report=True)
    policies = set().union(*(r.get("policy", {}) for r in report))
    assert policies == {"static", "lae_static", "dynamic"}
    full = jitted_apply(cfg)(q, ids)
    lengths = np.array([13, 20])
    logits, cache = jax.jit(prefill, static_argnums=(0, 4))(cfg, q, ids[:, :20],
                                                            jnp.asarray(lengths, jnp.int32), 64)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=1e-4, rtol=0)
    step = jax.jit(decode_step, static_argnums=0)
    rows = np.arange(2)[:, None]
    for start in range(0, 16, 8):  # 8-token chunks cross the sparse ring of 24 - 8 slots
        pos = lengths[:, None] + start + np.arange(8)[None, :]
        logits, cache = step(cfg, q, cache, ids[rows, pos])
        np.testing.assert_allclose(logits, full[rows, pos], atol=1e-4, rtol=0)


def test_orbax_round_trip(tiny, tmp_path):
    cfg, variables, calib, ids, _ = tiny
    q = quantize_model(variables, cfg, f"w4a8_integer_scale:{GROUPED}", calib)
    save_quantized(tmp_path / "ckpt", q, recipe="w4a8_integer_scale")
    back = load_quantized(tmp_path / "ckpt")
    assert jax.tree.structure(back) == jax.tree.structure(q)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(back)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jitted_apply(cfg)(back, ids), jitted_apply(cfg)(q, ids))
    with pytest.raises(ValueError, match="exists"):
        save_quantized(tmp_path / "ckpt", q)


@pytest.mark.slow  # the unrolled layout; the scanned one is quantized in the default pass
def test_unrolled_layers_quantize_too():
    cfg = tiny_config("model.scan_layers=false")
    variables = init_variables(cfg)
    ids = jnp.ones((1, 12), jnp.int32) * 9
    q = quantize_model(variables, cfg, "w8a8")
    assert isinstance(q["params"]["layers_1"]["moe"]["down"], QTensor)
    assert q["params"]["layers_1"]["moe"]["down"].batch_shape == (cfg.moe.num_experts,)
    assert _rel(jitted_apply(cfg)(q, ids), jitted_apply(cfg)(variables, ids)) < 0.03


def test_serve_engine_runs_quantized_params(tiny):
    """Continuous batching with MTP speculation over W4A16 params = greedy full forwards."""
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.sampling import SamplingParams

    cfg, variables, calib, _, _ = tiny
    variables = {**variables, "params": {**variables["params"],
                                         "lm_head": variables["params"]["lm_head"] * 40.0}}
    q = quantize_model(variables, cfg, f"w4a16:{GROUPED}")
    prompt = [5, 9, 200, 17, 33, 4, 81]
    ids = list(prompt)
    for _ in range(6):
        padded = np.zeros((1, 32), np.int32)
        padded[0, : len(ids)] = ids
        ids.append(int(jnp.argmax(jitted_apply(cfg)(q, jnp.asarray(padded))[0, len(ids) - 1])))
    engine = Engine(cfg, q, None, EngineConfig(max_num_seqs=2, max_model_len=32, page_size=8,
                                                 prefill_chunk=16, num_speculative_tokens=2))
    out = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert out[0].token_ids == ids[len(prompt):]


def test_refused_combinations_name_layer_and_setting(tiny):
    cfg, variables, calib, ids, _ = tiny
    q = quantize_model(variables, cfg, "w8a8")
    with pytest.raises(ValueError, match=r"layers/\w+/\w+ is already quantized \(int8"):
        quantize_model(q, cfg, "w8a8")
    with pytest.raises(ValueError, match=r"layers/attn_0/q_b: group_size=16 does not divide .* K=24"):
        quantize_model(variables, cfg, "w4a16:group_size=16")
    with pytest.raises(ValueError, match=r"layers/\w+/\w+: act_bits=4 is not supported"):
        quantize_model(variables, cfg, "w8a8:act_bits=4")
    with pytest.raises(ValueError, match=r"integer_scale=1024 needs group-wise"):
        quantize_model(variables, cfg, "w8a8:integer_scale=1024")
    with pytest.raises(ValueError, match="pass calib_data"):
        quantize_model(variables, cfg, f"fptq_w4a8:{GROUPED}")
    with pytest.raises(ValueError, match="not the params alone"):
        quantize_model(variables["params"], cfg, f"fptq_w4a8:{GROUPED}", calib)
    dense = tiny_config("model.moe.dispatch=dense")
    with pytest.raises(ValueError, match="moe.dispatch='dense' is the float oracle"):
        jitted_apply(dense)(q, ids)
    # Params alone are fine for recipes without calibration, and come back as params.
    assert isinstance(quantize_model(nn.unbox(variables["params"]), cfg, "w8a8")["lm_head"], jax.Array)
