"""Expert parallelism on 8 devices: the all-to-all MoE layer equals the single-device layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lcjax.config import ParallelConfig
from lcjax.config_io import load_config, resolve_config_path
from lcjax.model import moe as moe_lib
from lcjax.model.moe import BIAS_COLLECTION, MoE
from lcjax.parallel import expert_parallel, use_parallelism

from .conftest import mesh_of


def _setup(seed=0, batch=8, seq=6):
    cfg = load_config(resolve_config_path("tiny"), ["model.moe.num_experts=8"]).model
    x = jax.random.normal(jax.random.key(seed), (batch, seq, cfg.hidden_size))
    params = nn.unbox(MoE(cfg).init(jax.random.key(seed + 1), x)["params"])
    params["classifier"] = params["classifier"] * 20.0  # confident routing: few near-ties
    bias = 0.05 * jax.random.normal(jax.random.key(seed + 2), (cfg.moe.num_router_outputs,))
    return cfg, x, {"params": params, BIAS_COLLECTION: {"e_score_correction_bias": bias}}


def _loss_and_grads(cfg, variables, x):
    def fn(params, x):
        y, stats = MoE(cfg).apply({**variables, "params": params}, x)
        return jnp.sum(jnp.sin(y)), (y, stats.zero_share)
    return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(variables["params"], x)


@pytest.mark.parametrize("sizes", [dict(expert=8), dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2)],
                         ids=["ep8", "dp2-ep4", "fsdp2-ep2-tp2"])
def test_expert_parallel_equals_single_device(sizes, monkeypatch):
    cfg, x, variables = _setup()
    (want_l, (want_y, want_zero)), want_g = jax.jit(lambda v, x: _loss_and_grads(cfg, v, x))(variables, x)
    calls = []
    real = expert_parallel.expert_parallel_moe
    monkeypatch.setattr(expert_parallel, "expert_parallel_moe",
                        lambda *a, **k: calls.append(k["batch_axes"]) or real(*a, **k))
    mesh = mesh_of(**sizes)
    with use_parallelism(mesh, ParallelConfig(expert_dispatch="all_to_all")):
        x_sharded = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "expert"))))
        (got_l, (got_y, got_zero)), got_g = jax.jit(lambda v, x: _loss_and_grads(cfg, v, x))(
            variables, x_sharded)
        text = jax.jit(lambda v, x: _loss_and_grads(cfg, v, x)).lower(variables, x_sharded).as_text()
    assert calls and "expert" in calls[0]  # the all-to-all path ran
    assert "all_to_all" in text
    assert 0.0 < float(want_zero) < 1.0  # zero experts are exercised
    np.testing.assert_allclose(got_y, want_y, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5)
    np.testing.assert_allclose(got_g[1], want_g[1], atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5), got_g[0], want_g[0])


def test_zero_expert_slots_stay_on_their_device():
    """Only routed slots enter the send buffers; each lands in its expert's device, rows unique."""
    cfg, x, variables = _setup(seed=4)
    logits = jnp.einsum("TM,ME->TE", x.reshape(-1, cfg.hidden_size), variables["params"]["classifier"])
    ids, _ = moe_lib.route(logits, variables[BIAS_COLLECTION]["e_score_correction_bias"], cfg.moe)
    flat = ids.reshape(-1)
    dest, pos, keep = expert_parallel.dispatch_slots(flat, cfg.moe.num_experts, 4, 2, flat.size)
    routed = np.asarray(flat < cfg.moe.num_experts)
    assert 0 < routed.sum() < flat.size  # both kinds of slot occur
    np.testing.assert_array_equal(np.asarray(keep), routed)  # zero-expert slots are never sent
    np.testing.assert_array_equal(np.asarray(dest)[routed], np.asarray(flat)[routed] // 2)
    rows = {(int(d), int(p)) for d, p in zip(np.asarray(dest)[routed], np.asarray(pos)[routed])}
    assert len(rows) == routed.sum()  # no two slots share a buffer row
    for d in range(4):  # rows of each destination are 0..count-1
        got = sorted(int(p) for p, dd in zip(np.asarray(pos)[routed], np.asarray(dest)[routed]) if dd == d)
        assert got == list(range(len(got)))


def test_capacity_factor_drops_overflow_only():
    cfg, x, variables = _setup(seed=5)
    want, _ = jax.jit(MoE(cfg).apply)(variables, x)
    mesh = mesh_of(expert=8)
    outs = {}
    for factor in (0.0, 8.0, 0.5):  # dropless, large enough to drop nothing, dropping
        with use_parallelism(mesh, ParallelConfig(expert_dispatch="all_to_all",
                                                  expert_capacity_factor=factor)):
            outs[factor], _ = jax.jit(MoE(cfg).apply)(variables, x)
    np.testing.assert_allclose(outs[0.0], want, atol=2e-5)
    np.testing.assert_allclose(outs[8.0], want, atol=2e-5)
    assert float(jnp.max(jnp.abs(outs[0.5] - want))) > 1e-3  # overflow slots were dropped
    assert expert_parallel.capacity(48, 8, 0.0) == 48 and expert_parallel.capacity(48, 8, 0.5) == 3


def test_all_to_all_mode_refuses_a_mesh_without_expert_axis():
    cfg, x, variables = _setup()
    with use_parallelism(mesh_of(data=8), ParallelConfig(expert_dispatch="all_to_all")):
        with pytest.raises(ValueError, match="expert_dispatch='all_to_all'"):
            jax.jit(MoE(cfg).apply)(variables, x)
