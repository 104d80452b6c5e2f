"""MoE: router vs float64 NumPy, dense oracle == ragged dispatch (forward and gradient), bias update."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.model import moe as moe_lib
from lcjax.model.moe import BIAS_COLLECTION, MoE, route, update_router_bias

from . import numpy_reference as ref
from .conftest import tiny_config


def _setup(*overrides, seed=0):
    """A tiny MoE, its input [2, 9, M] and variables with a sharp router and a random bias."""
    cfg = tiny_config(*overrides)
    x = jax.random.normal(jax.random.key(seed), (2, 9, cfg.hidden_size))
    params = nn.unbox(MoE(cfg).init(jax.random.key(seed + 1), x)["params"])
    params["classifier"] = params["classifier"] * 20.0  # confident routing, few near-ties
    bias = 0.05 * jax.random.normal(jax.random.key(seed + 2), (cfg.moe.num_router_outputs,))
    return cfg, x, {"params": params, BIAS_COLLECTION: {"e_score_correction_bias": bias}}


def test_route_matches_numpy():
    cfg = tiny_config().moe
    logits = jax.random.normal(jax.random.key(0), (50, cfg.num_router_outputs)) * 3
    bias = jax.random.normal(jax.random.key(1), (cfg.num_router_outputs,)) * 0.1
    ids, weights = route(logits, bias, cfg)
    p = np.exp(np.asarray(logits, np.float64))
    p /= p.sum(-1, keepdims=True)
    want_ids = np.argsort(-(p + np.asarray(bias)), axis=-1, kind="stable")[:, : cfg.top_k]
    np.testing.assert_array_equal(np.sort(ids, -1), np.sort(want_ids, -1))
    want_w = np.take_along_axis(p, np.asarray(ids), -1) * cfg.routed_scaling_factor  # not renormalised
    np.testing.assert_allclose(weights, want_w, rtol=1e-6)


@pytest.mark.parametrize("zero_type", ["identity", "drop"])
@pytest.mark.parametrize("dispatch", ["ragged", "dense"])
def test_moe_matches_float64_numpy(dispatch, zero_type):
    cfg, x, variables = _setup(f"model.moe.dispatch={dispatch}", f"model.moe.zero_expert_type={zero_type}")
    y, stats = MoE(cfg).apply(variables, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    bias = np.asarray(variables[BIAS_COLLECTION]["e_score_correction_bias"])
    want = np.stack([ref.moe(np.asarray(x[b], np.float64), p, bias, cfg) for b in range(2)])
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
    assert 0.0 < float(stats.zero_share) < 1.0  # both kinds of expert are exercised


def test_ragged_equals_dense_forward_and_gradient():
    cfg, x, variables = _setup(seed=3)
    dense_cfg = tiny_config("model.moe.dispatch=dense")

    def loss(c):
        def fn(params, x):
            y, _ = MoE(c).apply({**variables, "params": params}, x)
            return jnp.sum(jnp.sin(y))
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))

    (lr, (gp_r, gx_r)), (ld, (gp_d, gx_d)) = (loss(cfg)(variables["params"], x),
                                              loss(dense_cfg)(variables["params"], x))
    np.testing.assert_allclose(lr, ld, rtol=1e-5)
    np.testing.assert_allclose(gx_r, gx_d, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), gp_r, gp_d)
    assert float(jnp.max(jnp.abs(gp_r["classifier"]))) > 0  # router learns through the weights


def test_zero_expert_slots_never_reach_the_expert_gemm(monkeypatch):
    cfg, x, variables = _setup()
    seen = []

    def spy(xs, w, group_sizes, **kw):
        seen.append(group_sizes)
        return jax.lax.ragged_dot(xs, w, group_sizes)

    monkeypatch.setattr(moe_lib, "grouped_matmul", spy)
    _, stats = MoE(cfg).apply(variables, x)
    routed_slots = float(jnp.sum(stats.tokens_per_expert[: cfg.moe.num_experts]))
    assert seen and all(int(jnp.sum(g)) == routed_slots for g in seen)
    assert routed_slots < x.shape[0] * x.shape[1] * cfg.moe.top_k


def test_routing_stats_respect_token_mask():
    cfg, x, variables = _setup()
    mask = jnp.arange(18).reshape(2, 9) % 3 != 0
    _, stats = MoE(cfg).apply(variables, x, mask)
    assert float(stats.tokens_per_expert.sum()) == int(mask.sum()) * cfg.moe.top_k
    _, full = MoE(cfg).apply(variables, x)
    assert float(full.tokens_per_expert.sum()) == 18 * cfg.moe.top_k


def test_bias_update_moves_routed_experts_toward_balance_and_leaves_zero_experts():
    cfg = tiny_config().moe
    e, z = cfg.num_experts, cfg.num_zero_experts
    bias = jnp.zeros((3, e + z))  # stacked over 3 layers
    counts = jnp.tile(jnp.concatenate([jnp.arange(e, dtype=jnp.float32), jnp.full((z,), 5.0)]), (3, 1))
    new = update_router_bias({"b": bias}, {"b": counts}, cfg)["b"]
    delta = np.asarray(new - bias) / cfg.bias_update_rate
    np.testing.assert_array_equal(delta[:, e:], 0.0)  # zero-expert biases untouched
    share = np.arange(e) / np.asarray(counts[0]).sum()
    np.testing.assert_array_equal(delta[0, :e], np.sign(share.mean() - share))
    # With a compute budget K_e, every routed expert below K_e / (K * E) is pushed up.
    budget = update_router_bias({"b": bias}, {"b": counts}, cfg, expected_ffn_topk=cfg.top_k)["b"]
    np.testing.assert_array_equal(np.asarray(budget[0, :e]) > 0, share < 1.0 / e)
