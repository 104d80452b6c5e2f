"""Whole-model tests: float64 NumPy parity, packing, causality, scan/remat equivalence, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lcjax.config_io import load_config, resolve_config_path
from lcjax.model import BIAS_COLLECTION, LongCatModel

from . import numpy_reference as ref
from .conftest import init_variables, jitted_apply, tiny_config


def _ids(seed, b, s, vocab, eos_at=()):
    ids = np.array(jax.random.randint(jax.random.key(seed), (b, s), 3, vocab))
    for row, col in eos_at:
        ids[row, col] = 2
    return jnp.asarray(ids, jnp.int32)


def test_logits_and_mtp_match_float64_numpy_reference(tiny):
    cfg, variables = tiny
    # 40 tokens > the LoZA window (1 sink + 2 local blocks of 8), EOS inside n-gram windows.
    ids = _ids(1, 2, 40, cfg.vocab_size, eos_at=[(0, 5), (0, 6), (1, 20)])
    logits, aux = jitted_apply(cfg)(variables, ids, return_aux=True)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    bias = jax.tree.map(np.asarray, variables[BIAS_COLLECTION])
    for b in range(2):
        want, want_mtp = ref.forward(params, bias, cfg, np.asarray(ids[b]))
        np.testing.assert_allclose(logits[b], want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(aux.mtp_logits[b], want_mtp, atol=1e-5, rtol=1e-5)


def test_packed_documents_equal_separate_runs(tiny):
    cfg, variables = tiny
    model = jitted_apply(cfg)
    a, b = _ids(2, 1, 13, cfg.vocab_size), _ids(3, 1, 30, cfg.vocab_size)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.asarray([[1] * 13 + [2] * 30], jnp.int32)
    got = model(variables, packed, segments)
    np.testing.assert_allclose(got[:, :13], model(variables, a), atol=1e-5)
    np.testing.assert_allclose(got[:, 13:], model(variables, b), atol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits(tiny):
    cfg, variables = tiny
    model = jitted_apply(cfg)
    ids = _ids(4, 2, 32, cfg.vocab_size)
    changed = ids.at[:, 20:].set((ids[:, 20:] + 7) % cfg.vocab_size)
    base, new = model(variables, ids), model(variables, changed)
    np.testing.assert_array_equal(base[:, :20], new[:, :20])
    assert float(jnp.max(jnp.abs(base[:, 20:] - new[:, 20:]))) > 1e-4


def _unstack_layers(tree, num_layers):
    """Scanned tree {'layers': [L, ...]} -> unrolled {'layers_i': ...}."""
    out = {k: v for k, v in tree.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a: a[i], tree["layers"])
    return out


def test_scan_equals_unrolled(tiny):
    cfg, variables = tiny
    ids = _ids(5, 2, 24, cfg.vocab_size)
    unrolled_cfg = tiny_config("model.scan_layers=false")
    unrolled = {col: _unstack_layers(t, cfg.num_layers) for col, t in variables.items()}
    want = jitted_apply(cfg)(variables, ids)
    got = jitted_apply(unrolled_cfg)(unrolled, ids)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # The unrolled init creates the same tree shape.
    shapes = jax.eval_shape(LongCatModel(unrolled_cfg).init, jax.random.key(0), ids)
    assert jax.tree.structure(nn.unbox(shapes)) == jax.tree.structure(unrolled)


def _loss(cfg, variables, ids):
    def fn(params):
        logits = LongCatModel(cfg).apply({**variables, "params": params}, ids[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
    return fn


@pytest.mark.parametrize("policy", ["full"])
def test_remat_gradients_equal_plain(tiny, policy):
    cfg, variables = tiny
    ids = _ids(6, 2, 17, cfg.vocab_size)
    want = jax.jit(jax.grad(_loss(cfg, variables, ids)))(variables["params"])
    got = jax.jit(jax.grad(_loss(tiny_config(f"model.remat_policy={policy}"), variables, ids)))(variables["params"])
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), got, want)


def test_gradients_match_finite_differences_float64():
    with jax.enable_x64(True):
        cfg = tiny_config("model.dtype=float64", "model.param_dtype=float64", "model.num_layers=1",
                          "model.loza.layer_pattern='01'")
        variables = init_variables(cfg)
        ids = _ids(7, 1, 28, cfg.vocab_size, eos_at=[(0, 9)])
        check_grads(jax.jit(_loss(cfg, variables, ids)), (variables["params"],), order=1, modes=["rev"],
                    atol=1e-6, rtol=1e-5, eps=1e-6)


def test_router_bias_is_separate_and_gets_no_gradient(tiny):
    cfg, variables = tiny
    ids = _ids(8, 2, 16, cfg.vocab_size)
    assert "e_score_correction_bias" not in str(jax.tree_util.tree_structure(variables["params"]))
    assert variables[BIAS_COLLECTION]["layers"]["moe"]["e_score_correction_bias"].shape == (
        cfg.num_layers, cfg.moe.num_router_outputs)

    @jax.jit
    def loss_wrt_bias(bias):
        return jnp.sum(LongCatModel(cfg).apply({**variables, BIAS_COLLECTION: bias}, ids) ** 2)

    grads = jax.grad(loss_wrt_bias)(variables[BIAS_COLLECTION])
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
    # ...yet the bias steers selection: a large bias on one routed expert changes the output.
    bumped = jax.tree.map(lambda b: b.at[..., 0].add(10.0), variables[BIAS_COLLECTION])
    assert not np.allclose(loss_wrt_bias(bumped), loss_wrt_bias(variables[BIAS_COLLECTION]))


def test_routing_statistics_are_returned(tiny):
    cfg, variables = tiny
    ids = _ids(9, 2, 16, cfg.vocab_size)
    _, aux = jitted_apply(cfg)(variables, ids, return_aux=True)
    counts = aux.routing.tokens_per_expert
    assert counts.shape == (cfg.num_layers, cfg.moe.num_router_outputs)
    np.testing.assert_allclose(counts.sum(-1), 2 * 16 * cfg.moe.top_k)
    zero = counts[:, cfg.moe.num_experts:].sum(-1) / counts.sum(-1)
    np.testing.assert_allclose(aux.routing.zero_share, zero, rtol=1e-6)


def test_bfloat16_compute_tracks_float32(tiny):
    cfg, variables = tiny
    ids = _ids(10, 2, 16, cfg.vocab_size)
    want = jitted_apply(cfg)(variables, ids)
    got = jitted_apply(tiny_config("model.dtype=bfloat16"))(variables, ids)
    assert got.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(got - want))) < 0.1 * float(jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("preset", ["longcat_flash", "longcat_flash_lite", "longcat_flash_zigzag"])
def test_full_size_presets_trace_without_allocating(preset):
    cfg = load_config(resolve_config_path(preset)).model
    ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(LongCatModel(cfg).init, jax.random.key(0), ids))
    expert = shapes["params"]["layers"]["moe"]["gate"]
    assert expert.shape == (cfg.num_layers, cfg.moe.num_experts, cfg.hidden_size, cfg.moe.expert_ffn_size)
    out = jax.eval_shape(lambda v, x: LongCatModel(cfg).apply(v, x), shapes, ids)
    assert out.shape == (1, 256, cfg.vocab_size)


def test_every_param_has_logical_axes(tiny):
    cfg, _ = tiny
    boxed = jax.eval_shape(LongCatModel(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == len(x.value.shape) for x in leaves)


@pytest.mark.parametrize("bad, match", [
    (jnp.zeros((2, 8), jnp.float32), "integer"),
    (jnp.zeros((8,), jnp.int32), "shape"),
    (jnp.zeros((1, 513), jnp.int32), "max_position_embeddings"),
])
def test_bad_token_ids_raise_value_error(tiny, bad, match):
    cfg, variables = tiny
    with pytest.raises(ValueError, match=match):
        LongCatModel(cfg).apply(variables, bad)
