"""block_sparse_attention: backend registry, default order, argument validation."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.block_sparse_attention import api, masks

_SPEC = jax.ShapeDtypeStruct
_Q, _K, _V = _SPEC((2, 6, 4, 8), jnp.float32), _SPEC((2, 5, 2, 8), jnp.float32), _SPEC(
    (2, 5, 2, 3), jnp.float32)


def _shapes(q=_Q, k=_K, v=_V, **kwargs):
    """Trace only (no compilation): validation and dispatch happen at trace time."""
    kwargs.setdefault("layout", masks.CausalLayout())
    arrays = {n: x for n, x in kwargs.items() if isinstance(x, _SPEC)}
    static = {n: x for n, x in kwargs.items() if n not in arrays}
    return jax.eval_shape(lambda q, k, v, arrays: api.block_sparse_attention(
        q, k, v, **arrays, **static), q, k, v, arrays)


def _spy(monkeypatch, name, fail=False):
    calls = []
    real = api.REGISTRY.implementations.get(name, api.attention_reference)

    def backend(*args, **kwargs):
        calls.append(name)
        if fail:
            raise NotImplementedError(f"{name} cannot run this case")
        return real(*args, **kwargs)

    monkeypatch.setitem(api.REGISTRY.implementations, name, backend)
    return calls


def test_xla_then_reference_end_every_default_order():
    assert {"xla", "reference"} <= set(api.available_implementations())
    for platform in ("cpu", "gpu", "tpu", "unknown"):
        assert api.default_order(platform)[-2:] == ("xla", "reference")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="default order differs off CPU")
def test_default_runs_xla_on_cpu(monkeypatch):
    calls = _spy(monkeypatch, "xla")
    out = _shapes(return_lse=True)
    assert calls == ["xla"]
    assert out[0].shape == (2, 6, 4, 3) and out[1].shape == (2, 4, 6)


def test_default_skips_a_backend_that_cannot_run_the_case(monkeypatch):
    fake = _spy(monkeypatch, "pallas_gpu", fail=True)
    xla = _spy(monkeypatch, "xla")
    monkeypatch.setitem(api.REGISTRY.orders, jax.default_backend(), ("pallas_gpu", "xla"))
    _shapes()
    assert fake == ["pallas_gpu"] and xla == ["xla"]


def test_named_backend_never_falls_back(monkeypatch):
    _spy(monkeypatch, "pallas_gpu", fail=True)
    xla = _spy(monkeypatch, "xla")
    with pytest.raises(NotImplementedError, match="pallas_gpu cannot run"):
        _shapes(implementation="pallas_gpu")
    assert xla == []


def test_unknown_implementation_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"implementation='flash'.*'xla'"):
        _shapes(implementation="flash")


@pytest.mark.parametrize("name", [n for n in api.KNOWN_IMPLEMENTATIONS
                                  if n not in api.available_implementations()])
def test_unavailable_implementation_says_so(name):
    with pytest.raises(NotImplementedError, match=rf"implementation='{name}'.*available"):
        _shapes(implementation=name)


@pytest.mark.parametrize("change, message", [
    (dict(q=_SPEC((2, 6, 32), jnp.float32)), "q must have rank 4"),
    (dict(k=_SPEC((2, 5, 2, 7), jnp.float32)), "k head dim 7"),
    (dict(k=_SPEC((3, 5, 2, 8), jnp.float32)), "batch sizes differ"),
    (dict(v=_SPEC((2, 4, 2, 3), jnp.float32)), "must match k shape"),
    (dict(k=_SPEC((2, 5, 3, 8), jnp.float32), v=_SPEC((2, 5, 3, 3), jnp.float32)),
     "H=4 must be a multiple of kv heads G=3"),
    (dict(q=_SPEC((2, 6, 4, 8), jnp.int32)), "q.dtype=int32"),
    (dict(v=_SPEC((2, 5, 2, 3), jnp.bfloat16)), "dtypes differ"),
    (dict(layout="causal"), "layout='causal'"),
    (dict(q_segment_ids=_SPEC((2, 6), jnp.int32)), "given together"),
    (dict(q_positions=_SPEC((2, 5), jnp.int32)), r"q_positions shape \(2, 5\)"),
    (dict(kv_positions=_SPEC((2, 5), jnp.float32)), "kv_positions.dtype=float32"),
    (dict(scale=-1.0), "scale=-1.0"),
    (dict(scale=float("nan")), "scale=nan"),
])
def test_validation_names_the_bad_value(change, message):
    with pytest.raises(ValueError, match=message):
        _validate_only(**change)


def _validate_only(q=_Q, k=_K, v=_V, layout=masks.CausalLayout(), **kwargs):
    """The same checks without the annotations' runtime type checking in the way."""
    return api._validate(q, k, v, layout, kwargs.get("q_positions"), kwargs.get("kv_positions"),
                         kwargs.get("q_segment_ids"), kwargs.get("kv_segment_ids"),
                         kwargs.get("scale"), kwargs.get("return_lse", False))


def test_validation_runs_on_the_public_call():
    # Shapes consistent with the annotations, so the ValueError comes from our validation.
    with pytest.raises(ValueError, match="multiple of kv heads G=3"):
        _shapes(k=_SPEC((2, 5, 3, 8), jnp.float32), v=_SPEC((2, 5, 3, 3), jnp.float32))


def test_default_scale_is_dk_to_the_minus_half():
    assert _validate_only() == 8**-0.5
    assert _validate_only(scale=0.25) == 0.25
