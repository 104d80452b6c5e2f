"""LoRA adapters: step 0 is the base model, merged = unmerged at lam = 0 (including per-expert
adapters, both MoE dispatches), which weights each target pattern selects, and the AFA schedule."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.config import AfaConfig, LoraConfig
from lcjax.config_io import load_config, resolve_config_path
from lcjax.lora.adapters import attach, init_adapters, sites_of, target_sites
from lcjax.lora.afa import afa_lambda, afa_lambda_at
from lcjax.lora.merge import merge_adapters
from lcjax.model import BIAS_COLLECTION, LongCatModel
from lcjax.model.layers import LORA_COLLECTION


def _model(*overrides):
    cfg = load_config(resolve_config_path("tiny"), ["model.vocab_size=64", "model.num_layers=1",
                                                     "model.loza.layer_pattern=01", *overrides])
    ids = jax.random.randint(jax.random.key(1), (2, 16), 3, 64)
    variables = nn.unbox(jax.jit(LongCatModel(cfg.model).init)(jax.random.key(0), ids))
    return cfg, variables, ids


def _logits(cfg, variables, ids, adapters=None, lora=None, lam=0.0):
    v = {"params": variables["params"], BIAS_COLLECTION: variables[BIAS_COLLECTION]}
    if adapters is not None:
        v[LORA_COLLECTION] = attach(adapters, lora, lam, cfg.model.scan_layers)
    logits, mtp = _apply(cfg.model, v, ids)
    return np.asarray(logits), np.asarray(mtp)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model_cfg, variables, ids):
    logits, aux = LongCatModel(model_cfg).apply(variables, ids, return_aux=True)
    return logits, aux.mtp_logits


def _random_b(adapters, key):
    """Adapters with B drawn too (a trained adapter), so merging has something to fold."""
    flat = sites_of(adapters)
    out = jax.tree.map(lambda x: x, adapters)
    for i, (path, ad) in enumerate(sorted(flat.items())):
        node = out
        for p in path:
            node = node[p]
        node["b"] = 0.05 * jax.random.normal(jax.random.fold_in(key, i), ad["b"].shape)
    return out


@pytest.mark.parametrize("dispatch", ["ragged", pytest.param("dense", marks=pytest.mark.slow)])
def test_zero_b_is_the_base_model_and_merge_is_exact(dispatch):
    cfg, variables, ids = _model(f"model.moe.dispatch={dispatch}")
    lora = LoraConfig(rank=3, alpha=6.0, targets="all", afa=AfaConfig(activation="silu"))
    adapters = init_adapters(jax.random.key(2), variables["params"], lora, cfg.model.scan_layers)
    base = _logits(cfg, variables, ids)
    for got, want in zip(_logits(cfg, variables, ids, adapters, lora, lam=0.7), base):
        np.testing.assert_array_equal(got, want)  # B = 0: exactly the base, at any lam
    trained = _random_b(adapters, jax.random.key(3))
    unmerged = _logits(cfg, variables, ids, trained, lora, lam=0.0)
    assert np.abs(unmerged[0] - base[0]).max() > 1e-3  # the adapters do something
    merged = {**variables, "params": merge_adapters(variables["params"], trained, lora)}
    for got, want in zip(_logits(cfg, merged, ids), unmerged):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    nonlinear = _logits(cfg, variables, ids, trained, lora, lam=1.0)
    assert np.abs(nonlinear[0] - unmerged[0]).max() > 1e-4  # lam switches the activation on


def test_targets_select_hooked_weights():
    cfg, variables, _ = _model()
    params, scan = variables["params"], cfg.model.scan_layers
    default = {"/".join(p) for p in target_sites(params, LoraConfig(rank=2), scan)}
    assert "layers/attn_0/q_a" in default and "layers/moe/down" in default
    assert "layers/mlp_1/up" in default and not any(p.startswith("mtp/") for p in default)
    assert not any(p.endswith(("kv_b", "lm_head", "classifier")) for p in default)
    mtp = {"/".join(p) for p in target_sites(params, LoraConfig(rank=2, targets="mtp"), scan)}
    assert mtp == {f"mtp/attn/{w}" for w in ("q_a", "q_b", "kv_a", "o")} | {
        f"mtp/mlp/{w}" for w in ("gate", "up", "down")}
    adapters = init_adapters(jax.random.key(0), params, LoraConfig(rank=2), scan)
    moe = adapters["layers"]["moe"]
    e, m, f = cfg.model.moe.num_experts, cfg.model.hidden_size, cfg.model.moe.expert_ffn_size
    assert moe["gate"]["a"].shape == (1, e, m, 2) and moe["gate"]["b"].shape == (1, e, 2, f)
    assert adapters["layers"]["attn_0"]["o"]["a"].shape == (1, 4, 8, 2)  # [L, H, Dv, r]
    with pytest.raises(ValueError, match=r"lora.targets='eh_proj'.*matches \['mtp/eh_proj'\]"):
        target_sites(params, LoraConfig(rank=2, targets="eh_proj"), scan)


@pytest.mark.slow
def test_unscanned_layers_get_the_same_adapters():
    cfg, variables, ids = _model("model.scan_layers=false")
    lora = LoraConfig(rank=2)
    adapters = _random_b(init_adapters(jax.random.key(2), variables["params"], lora, False),
                         jax.random.key(4))
    assert "layers_0" in adapters
    merged = {**variables, "params": merge_adapters(variables["params"], adapters, lora)}
    np.testing.assert_allclose(_logits(cfg, merged, ids)[0],
                               _logits(cfg, variables, ids, adapters, lora)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_afa_schedule_anneals_to_zero_and_stays(schedule):
    lora = LoraConfig(rank=2, afa=AfaConfig(activation="relu", schedule=schedule,
                                            start_fraction=0.2, anneal_fraction=0.5))
    lams = [afa_lambda_at(t, lora, 10) for t in range(11)]
    assert lams[:3] == [1.0, 1.0, 1.0] and lams[7:] == [0.0] * 4
    assert all(a >= b for a, b in zip(lams, lams[1:]))
    assert 0.0 < lams[4] < 1.0
    traced = jax.jit(lambda t: afa_lambda(t, lora, 10))
    assert [float(traced(jnp.int32(t))) for t in range(11)] == lams
    assert afa_lambda_at(0, LoraConfig(rank=2), 10) == 0.0  # plain LoRA


@pytest.mark.parametrize("key, value, what", [
    ("lora.rank", "-1", "an integer >= 0"),
    ("lora.alpha", "0", "> 0"),
    ("lora.dropout", "1.0", r"a rate in \[0, 1\)"),
    ("lora.targets", "'(('", "a valid regex"),
    ("lora.afa.activation", "tanh", "one of"),
    ("lora.afa.schedule", "step", "one of"),
])
def test_config_names_the_bad_value(key, value, what):
    with pytest.raises(ValueError, match=rf"{key}=.* is invalid: expected .*{what}"):
        load_config(None, [f"{key}={value}"])


def test_dropout_only_with_its_rng():
    from lcjax.model.layers import LORA_DROPOUT_RNG, SwiGLU

    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    mlp = SwiGLU(16)
    params = mlp.init(jax.random.key(1), x)["params"]
    lora = LoraConfig(rank=2, dropout=0.5, targets="all")
    adapters = {"gate": {"a": jnp.ones((8, 2)), "b": jnp.ones((2, 16))}}
    v = {"params": params, LORA_COLLECTION: attach(adapters, lora, 0.0, False)}
    plain = mlp.apply(v, x)
    np.testing.assert_array_equal(plain, mlp.apply(v, x))  # no rng: no dropout
    dropped = [mlp.apply(v, x, rngs={LORA_DROPOUT_RNG: jax.random.key(k)}) for k in (0, 1)]
    assert np.abs(dropped[0] - plain).max() > 1e-3 and np.abs(dropped[0] - dropped[1]).max() > 1e-3
