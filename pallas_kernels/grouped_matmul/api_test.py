"""Backend selection and argument validation of gmm / tgmm (the contract itself is per backend)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import api, megablox, pallas_gpu, pallas_tpu, xla

F32 = jnp.float32
LHS = jax.ShapeDtypeStruct((64, 32), F32)
RHS = jax.ShapeDtypeStruct((4, 32, 48), F32)
SIZES = jax.ShapeDtypeStruct((4,), jnp.int32)


def _primitives(fn, *args):
    return {str(eqn.primitive) for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def test_default_order_ends_with_xla_on_every_platform():
    assert api.default_order("cpu") == ("segments", "xla")
    assert api.default_order("tpu") == ("pallas_tpu", "megablox", "segments", "xla")
    gpu = api.default_order("gpu")
    assert gpu[0] == "pallas_gpu" and gpu[-2:] == ("segments", "xla")
    assert api.default_order("some_new_platform") == ("xla",)
    assert set(api.available_implementations()) >= {"pallas_tpu", "megablox", "pallas_gpu",
                                                    "segments", "xla"}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU default")
def test_default_on_cpu_runs_segments_forward_and_backward():
    """Row tiles as plain dots: no ragged_dot (a masked contraction against every group on CPU)."""
    def loss(lhs, rhs, sizes):
        return api.gmm(lhs, rhs, sizes).sum()

    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(LHS, RHS, SIZES))  # scans too
    assert " dot_general[" in text
    assert "ragged_dot_general" not in text and "pallas_call" not in text


def test_default_order_skips_a_backend_that_cannot_run_the_case(monkeypatch):
    """On a GPU, float16 is outside the kernels' dtypes: the default order falls through to
    segments; bfloat16 goes to pallas_gpu."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    ran = []
    for name in api.default_order("gpu"):
        module = api.backend_module(name)
        real = module.gmm
        monkeypatch.setattr(module, "gmm", lambda *a, _n=name, _r=real, **k: (
            ran.append(_n), _r(*a, **k))[1])
    for dtype in (jnp.float16, jnp.bfloat16):
        lhs, rhs = (jax.ShapeDtypeStruct(x.shape, dtype) for x in (LHS, RHS))
        out = jax.eval_shape(lambda a, b, s: api.gmm(a, b, s), lhs, rhs, SIZES)
        assert out.shape == (64, 48) and out.dtype == dtype
    assert ran == ["segments", "pallas_gpu"]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="kernels really run on accelerators")
@pytest.mark.parametrize("name", ["pallas_gpu", "pallas_tpu", "megablox"])
def test_a_named_backend_never_falls_back(name):
    with pytest.raises(NotImplementedError, match=r"platform='cpu'.*supported"):
        jax.eval_shape(lambda a, b, s: api.gmm(a, b, s, implementation=name), LHS, RHS, SIZES)
    config = dict(pallas_gpu=pallas_gpu.Config(interpret=True),
                  pallas_tpu=pallas_tpu.Config(interpret=True),
                  megablox=megablox.Config(interpret=True))[name]
    f16 = [jax.ShapeDtypeStruct(x.shape, jnp.float16) for x in (LHS, RHS)]
    with pytest.raises(NotImplementedError, match=r"dtype=float16.*supported: \('bfloat16', "):
        jax.eval_shape(lambda a, b, s: api.gmm(a, b, s, implementation=name, config=config),
                       *f16, SIZES)


def test_unknown_and_unavailable_implementations():
    with pytest.raises(ValueError, match="implementation='cuda' is not one of"):
        jax.eval_shape(lambda a, b, s: api.gmm(a, b, s, implementation="cuda"), LHS, RHS, SIZES)
    if "triton" not in api.available_implementations():  # no jax-triton / GPU jaxlib here
        with pytest.raises(NotImplementedError, match="implementation='triton' is not available"):
            jax.eval_shape(lambda a, b, s: api.gmm(a, b, s, implementation="triton"), LHS, RHS,
                           SIZES)


def test_validation_errors_name_the_bad_value():
    lhs, rhs, sizes = jnp.ones((8, 4)), jnp.ones((2, 4, 3)), jnp.array([3, 5])
    with pytest.raises(ValueError, match="lhs.dtype=bfloat16 != rhs.dtype=float32"):
        api.gmm(lhs.astype(jnp.bfloat16), rhs, sizes)
    with pytest.raises(ValueError, match="needs a named implementation"):
        api.gmm(lhs, rhs, sizes, config=pallas_gpu.Config(interpret=True))
    with pytest.raises(ValueError, match="must be a pallas_gpu.Config"):
        api.gmm(lhs, rhs, sizes, implementation="pallas_gpu",
                config=pallas_tpu.Config(interpret=True))
    with pytest.raises(ValueError, match="preferred_element_type=.*int32.* must be a float"):
        api.gmm(lhs, rhs, sizes, preferred_element_type=jnp.int32)
    with pytest.raises(ValueError, match="block_m=24 must be a power of 2"):
        pallas_gpu.Config(block_m=24)
    with pytest.raises(ValueError, match="block_k=200 must be a multiple of 128"):
        pallas_tpu.Config(block_k=200)
    pallas_tpu.Config(block_k=200, interpret=True)  # any size in interpret mode


def test_empty_row_set_gives_empty_results():
    out = api.gmm(jnp.ones((0, 4)), jnp.ones((2, 4, 3)), jnp.array([0, 0]))
    assert out.shape == (0, 3)
    w = api.tgmm(jnp.ones((0, 4)), jnp.ones((0, 3)), jnp.array([0, 0]))
    assert w.shape == (2, 4, 3) and not np.any(np.asarray(w))


def test_xla_backend_takes_no_config():
    with pytest.raises(NotImplementedError, match="takes no config"):
        xla.check(LHS, RHS, out_dtype=F32, config=pallas_gpu.Config())


@pytest.mark.parametrize("name", ["pallas_gpu_interpret", "pallas_tpu_interpret",
                                  "megablox_interpret"])
def test_interpret_variants_run_the_kernels_and_match_the_reference(name):
    """"<name>_interpret" runs the backend's Pallas kernels in the interpreter (no config needed)
    and agrees with the xla reference in the forward and both gradients."""
    if name not in api.available_implementations():
        pytest.skip(f"{name} not importable here")
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal((64, 32)), F32)
    rhs = jnp.asarray(rng.standard_normal((4, 32, 48)), F32)
    sizes = jnp.asarray([20, 0, 30, 10], jnp.int32)  # 4 rows past the groups
    d_out = jnp.asarray(rng.standard_normal((64, 48)), F32)

    def run(impl):
        out, vjp = jax.vjp(lambda a, b: api.gmm(a, b, sizes, implementation=impl), lhs, rhs)
        return (out, *vjp(d_out))

    jaxpr = jax.make_jaxpr(lambda a, b, s: api.gmm(a, b, s, implementation=name))(LHS, RHS, SIZES)
    assert "pallas_call" in str(jaxpr)  # inside the custom VJP
    for got, want in zip(run(name), run("xla")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-4)
    assert isinstance(api.backend_module(name).Config(), api.backend_module(name[:-10]).Config)
