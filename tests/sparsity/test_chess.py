"""CHESS / CATS / CHESS+ thresholds against a float64 numpy reference, and the model hook:
s=0 is exactly dense, a thresholded FFN equals where(|silu(g)| > t), cached decode equals the
full forward, the measured sparsity is near the target."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.model import decode_step, init_cache
from lcjax.model.layers import SwiGLU
from lcjax.ops import activation_sparsity
from lcjax.sparsity import chess
from pallas_kernels.sparse_gemv import api as gemv_api
from tests.model.conftest import init_variables, jitted_apply, tiny_config


def _quantile(v, q):
    """Linear-interpolation quantile by sorting (numpy's default method), float64."""
    v = np.sort(np.asarray(v, np.float64).ravel())
    pos = q * (len(v) - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def _reference(acts, ups, s, method):
    """One dense FFN site, written out: E|u| over all rows, per-batch quantiles averaged."""
    if method == "cats":
        return np.full(acts[0].shape[1], np.mean([_quantile(a, s) for a in acts]))
    rows = sum(a.shape[0] for a in acts)
    mean_u = np.zeros(acts[0].shape[1])
    for u in ups:
        for r in range(u.shape[0]):
            mean_u += np.abs(u[r]) / rows
    tau = np.mean([_quantile(np.abs(a) * mean_u, s) for a in acts])
    return tau / mean_u


def _stats(rng, batches, lead=(2,), rows=24, f=16, e=4):
    out = []
    for _ in range(batches):
        sizes = rng.multinomial(rows - 3, np.ones(e) / e, size=lead).astype(np.int32)  # 3 pad rows
        out.append({
            ("layers", "mlp_0", "gate"): {"act": rng.exponential(size=lead + (rows, f)),
                                          "up": rng.exponential(size=lead + (rows, f))},
            ("layers", "moe", "gate"): {"act": rng.exponential(size=lead + (rows, f)),
                                        "up": rng.exponential(size=lead + (rows, f)), "sizes": sizes},
            ("layers", "attn_0", "q_a"): {"act": rng.exponential(size=lead + (rows, f))},
            ("layers", "attn_0", "o"): {"act": rng.exponential(size=lead + (rows, 2, 8))},
        })
    return out


@pytest.mark.parametrize("method", ["cats", "chess", "chess+"])
@pytest.mark.parametrize("s", [0.3, 0.7])
def test_thresholds_match_float64_reference(method, s):
    rng = np.random.default_rng(0)
    stats = _stats(rng, batches=3)
    got = chess.thresholds_from_stats(stats, s, method)
    want_sites = {("layers", "mlp_0", "gate"), ("layers", "moe", "gate")}
    if method == "chess+":
        want_sites |= {("layers", "attn_0", "q_a"), ("layers", "attn_0", "o")}
    assert set(got) == want_sites
    ffn = ("layers", "mlp_0", "gate")
    moe = ("layers", "moe", "gate")
    for layer in range(2):
        want = _reference([b[ffn]["act"][layer] for b in stats], [b[ffn]["up"][layer] for b in stats],
                          s, "cats" if method == "cats" else "chess")
        np.testing.assert_allclose(got[ffn][layer], want, rtol=1e-6)
        for e in range(4):  # experts: only the rows routed to expert e (rows past the groups: padding)
            acts, ups = [], []
            for b in stats:
                start = int(b[moe]["sizes"][layer, :e].sum())
                n = int(b[moe]["sizes"][layer, e])
                if n:
                    acts.append(b[moe]["act"][layer, start:start + n])
                    ups.append(b[moe]["up"][layer, start:start + n])
            want = _reference(acts, ups, s, "cats" if method == "cats" else "chess")
            np.testing.assert_allclose(got[moe][layer, e], want, rtol=1e-6)
        if method == "chess+":
            for site, shape in (("q_a", (16,)), ("o", (2, 8))):
                p = ("layers", "attn_0", site)
                tau = np.mean([_quantile(b[p]["act"][layer], s) for b in stats])
                np.testing.assert_allclose(got[p][layer], np.full(shape, tau), rtol=1e-6)


def test_sparsity_zero_gives_zero_thresholds_and_spec_parsing():
    stats = _stats(np.random.default_rng(1), batches=2)
    assert all(np.all(t == 0) for t in chess.thresholds_from_stats(stats, 0.0, "chess+").values())
    assert chess.parse_spec("chess:s=0.5") == ("chess", 0.5)
    assert chess.parse_spec("chess+:s=0.3") == ("chess+", 0.3)
    assert chess.parse_spec("cats") == ("cats", 0.5)
    for bad in ("chess:s=1.0", "chess:s=-0.1", "dejavu:s=0.5", "chess:x=0.5", "chess:s=abc"):
        with pytest.raises(ValueError, match="activation sparsity"):
            chess.parse_spec(bad)


def test_swiglu_hook_equals_numpy_threshold():
    """The dense FFN with thresholds t: down((silu(g) * [|silu(g)| > t]) * up), in float64."""
    m, f = 8, 12
    rng = np.random.default_rng(2)
    module = SwiGLU(f)
    x = jnp.asarray(rng.normal(size=(2, 3, m)), jnp.float32)
    params = nn.unbox(module.init(jax.random.key(0), x))["params"]
    t = jnp.asarray(rng.uniform(0.0, 0.02, size=(f,)), jnp.float32)
    got = module.apply({"params": params, activation_sparsity.COLLECTION: {"gate": t}}, x)
    xg, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, params["gate"], params["up"], params["down"]))
    g = xg @ wg
    a = g / (1 + np.exp(-g))
    a = np.where(np.abs(a) > np.asarray(t, np.float64), a, 0.0)
    assert 0 < np.mean(a == 0) < 1  # the thresholds do cut some channels
    np.testing.assert_allclose(np.asarray(got), (a * (xg @ wu)) @ wd, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def calibrated():
    cfg = tiny_config()
    variables = init_variables(cfg)
    rng = np.random.default_rng(0)
    calib = [rng.integers(3, cfg.vocab_size, (2, 32), dtype=np.int32) for _ in range(2)]
    stats = chess.collect_stats(cfg, variables, calib)
    ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 24), dtype=np.int32))
    return cfg, variables, calib, stats, ids


def _thresholds(stats, s, method):
    flat = {p: jnp.asarray(t) for p, t in chess.thresholds_from_stats(stats, s, method).items()}
    from flax import traverse_util
    return chess.ChessThresholds(traverse_util.unflatten_dict(flat), method, s)


def test_zero_thresholds_give_the_dense_model_and_others_change_it(calibrated):
    cfg, variables, _, stats, ids = calibrated
    dense = jitted_apply(cfg)(variables, ids)
    zero = jitted_apply(cfg)(chess.with_thresholds(variables, _thresholds(stats, 0.0, "chess+")), ids)
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(dense))
    sparse = jitted_apply(cfg)(chess.with_thresholds(variables, _thresholds(stats, 0.5, "chess+")), ids)
    assert float(jnp.max(jnp.abs(sparse - dense))) > 1e-3
    assert set(chess.with_thresholds(variables, None)) == set(variables) - {activation_sparsity.COLLECTION}


@pytest.mark.parametrize("gemv", [pytest.param("xla", marks=pytest.mark.slow), "xla_gather"])
def test_cached_decode_equals_full_forward_with_thresholds(calibrated, gemv, monkeypatch):
    """A chunk + one-token decode steps over the latent cache (absorbed MLA) apply the same
    thresholds as the full forward, for every site of CHESS+; decode's dense FFN down
    projections go through the sparse GEMV op (here its default forced to `gemv`)."""
    monkeypatch.setitem(gemv_api.REGISTRY.orders, "cpu", (gemv, "xla"))
    calls = []
    real = gemv_api.REGISTRY.select
    monkeypatch.setattr(gemv_api.REGISTRY, "select", lambda *a: calls.append(1) or real(*a))
    cfg, variables, _, stats, ids = calibrated
    v = chess.with_thresholds(variables, _thresholds(stats, 0.5, "chess+"))
    full = jitted_apply(cfg)(v, ids)
    step = jax.jit(lambda c, t: decode_step(cfg, v, c, t))
    logits, cache = step(init_cache(cfg, 2, 32), ids[:, :16])  # a 16-token chunk, then tokens
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :16]), atol=2e-4)
    for i in range(16, 20):
        out, cache = step(cache, ids[:, i:i + 1])
        np.testing.assert_allclose(np.asarray(out[:, 0]), np.asarray(full[:, i]), atol=2e-4)
    assert len(calls) == 2 * cfg.num_layers  # both dense MLPs per layer, traced once (2 rows <= 16)


def test_measured_sparsity_is_near_the_target(calibrated):
    """On its own calibration data every site zeroes about s of its activations (later layers
    see sparsified inputs, so not exactly s)."""
    cfg, variables, calib, stats, _ = calibrated
    th = _thresholds(stats, 0.5, "chess+")
    seen = chess.activity(chess.collect_stats(cfg, chess.with_thresholds(variables, th), calib), th)
    assert {p[-1] for p in seen} == {"gate", "q_a", "o"}
    for path, a in seen.items():
        density = a["active"] / (a["rows"] * a["channels"])
        assert np.all(np.abs(density - 0.5) < 0.1), (path, density)
