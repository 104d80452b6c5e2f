"""The whole tiny model (packed documents, LoZA sublayers, MTP head) through each attention
backend: loss and parameter gradients equal those through the dense reference, and the named
backend is the one that ran."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.model import LongCatModel
from pallas_kernels.block_sparse_attention import api

from .conftest import init_variables, tiny_config

S_LEN = 40  # > (sink + local) * block = 24 tokens, so LoZA layers skip blocks


def _batch():
    """Two rows of packed documents (ids 1, 2, ...); row 0 ends in a padding run (id 0)."""
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 256, (2, S_LEN)), jnp.int32)
    seg = np.stack([np.repeat([1, 2, 0], [23, 13, 4]), np.repeat([1, 2], [9, S_LEN - 9])])
    return ids, jnp.asarray(seg, jnp.int32)


def _loss_and_grads(cfg, variables):
    """A scalar touching every output (logits, MTP logits, aux) and its parameter gradients."""
    ids, seg = _batch()

    def loss(params):
        out = LongCatModel(cfg).apply({**variables, "params": params}, ids, seg, return_aux=True)
        floats = [x for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.floating)]
        return sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in floats)

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_config("model.attention_impl=reference")
    assert cfg.loza.layer_pattern and cfg.mtp_layers == 1
    variables = init_variables(cfg)
    return cfg, variables, _loss_and_grads(cfg, variables)


def spy_all(monkeypatch):
    """Record which registered backends run (at trace time)."""
    calls = []
    for name, real in list(api.REGISTRY.implementations.items()):
        def spy(*args, _name=name, _real=real, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setitem(api.REGISTRY.implementations, name, spy)
    return calls


# Every case compiles the model's gradient (~30 s on 2 cores), hence `slow`; the quick loop still
# runs the default "xla" path through test_model.py's float64 oracle and finite differences.
_CASES = [
    pytest.param("xla", "xla", id="xla", marks=pytest.mark.slow),
    pytest.param(None, api.default_order()[0], id="default", marks=pytest.mark.slow),
    pytest.param("pallas_gpu_interpret", "pallas_gpu_interpret", id="pallas_gpu_interpret",
                 marks=pytest.mark.slow),
    pytest.param("pallas_tpu_interpret", "pallas_tpu_interpret", id="pallas_tpu_interpret",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("impl, ran", _CASES)
def test_model_through_backend_equals_reference(reference, monkeypatch, impl, ran):
    cfg_ref, variables, (want_loss, want_grads) = reference
    cfg = dataclasses.replace(cfg_ref, attention_impl=impl)
    calls = spy_all(monkeypatch)
    if impl is None and ran == "xla":  # CPU: the same program as the "xla" case; trace only
        jax.eval_shape(lambda: _loss_and_grads(cfg, variables))
        assert calls and set(calls) == {ran}, calls
        return
    loss, grads = _loss_and_grads(cfg, variables)
    assert calls and set(calls) == {ran}, calls
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    paths = jax.tree_util.tree_leaves_with_path(want_grads)
    for (path, want), got in zip(paths, jax.tree.leaves(grads)):
        want, got = np.asarray(want), np.asarray(got)
        err, size = np.max(np.abs(got - want)), np.max(np.abs(want))
        assert err <= 2e-4 * max(size, 1e-3), f"{jax.tree_util.keystr(path)}: {err:.3g} / {size:.3g}"


def test_other_kernels_are_covered_elsewhere():
    """Backends not run through the model here, and why (each has its own contract tests)."""
    not_here = {"splash_interpret": "explicit per-document positions (its mask is static)",
                "triton_interpret": "Triton interprets only under TRITON_INTERPRET=1 (child "
                                    "process in triton_test.py)"}
    run_here = {c.values[0] for c in _CASES}
    interpret = {n for n in api.KNOWN_IMPLEMENTATIONS if n.endswith("_interpret")}
    assert interpret == (run_here | set(not_here)) & interpret


def test_config_accepts_exactly_the_registered_names():
    from lcjax.config import _ATTENTION_IMPLS

    assert set(_ATTENTION_IMPLS) == set(api.KNOWN_IMPLEMENTATIONS) | {None}
