"""Backend selection and argument validation of quant_matmul / quant_gmm (the contract itself
is per backend)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant_matmul import api, pallas_gpu, pallas_tpu, reference, xla

S = jax.ShapeDtypeStruct
X8, XF = S((16, 64), jnp.int8), S((16, 64), jnp.bfloat16)
W8, W4 = S((64, 48), jnp.int8), S((32, 48), jnp.int8)
CH, GR, GI = S((48,), jnp.float32), S((2, 48), jnp.float32), S((2, 48), jnp.int32)
XS = S((16,), jnp.float32)


def _primitives(fn, *args):
    return {str(eqn.primitive) for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def test_registry_and_default_order_ends_with_xla():
    assert api.default_order("cpu") == ("segments", "xla")
    assert api.default_order("tpu") == ("pallas_tpu", "xla")
    assert api.default_order("gpu")[0] == "pallas_gpu" and api.default_order("gpu")[-1] == "xla"
    assert api.default_order("some_new_platform") == ("xla",)
    assert {"xla", "segments", "pallas_gpu", "pallas_tpu", "pallas_gpu_interpret",
            "pallas_tpu_interpret"} <= set(api.available_implementations())


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU default")
def test_default_on_cpu_is_the_reference_with_tiled_grouped_products():
    prims = _primitives(lambda x, w, s, xs: api.quant_matmul(x, w, w_scale=s, x_scale=xs), X8,
                        W8, CH, XS)
    assert "dot_general" in prims and "pallas_call" not in prims
    prims = _primitives(lambda x, w, g, s, xs: api.quant_gmm(x, w, g, w_scale=s, x_scale=xs), X8,
                        S((3, 64, 48), jnp.int8), S((3,), jnp.int32), S((3, 48), jnp.float32), XS)
    assert "dot_general" in prims and "ragged_dot_general" not in prims
    prims = _primitives(lambda x, w, s: api.quant_matmul(x, w, w_scale=s, bits=4,
                                                         implementation="pallas_gpu_interpret"),
                        XF, W4, CH)
    assert "pallas_call" in prims


def test_default_order_skips_a_backend_that_cannot_run_the_case(monkeypatch):
    """On a TPU, float16 activations are outside the kernel's dtypes: the default falls through
    to xla; bfloat16 goes to pallas_tpu."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    ran = []
    for name in ("pallas_tpu", "xla"):
        module = api.backend_module(name)
        real = module.quant_matmul
        monkeypatch.setattr(module, "quant_matmul", lambda *a, _n=name, _r=real, **k: (
            ran.append(_n), _r(*a, **k))[1])
    for dtype in (jnp.float16, jnp.bfloat16):
        out = jax.eval_shape(lambda x, w, s: api.quant_matmul(x, w, w_scale=s, bits=4),
                             S((16, 64), dtype), W4, CH)
        assert out.shape == (16, 48) and out.dtype == jnp.bfloat16
    assert ran == ["xla", "pallas_tpu"]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="kernels really run on accelerators")
@pytest.mark.parametrize("name", ["pallas_gpu", "pallas_tpu", "triton"])
def test_a_named_backend_never_falls_back(name):
    if name not in api.available_implementations():
        pytest.skip(f"{name} not importable here")
    with pytest.raises(NotImplementedError, match=r"platform='cpu' is not supported"):
        jax.eval_shape(lambda x, w, s, xs: api.quant_matmul(x, w, w_scale=s, x_scale=xs,
                                                            implementation=name), X8, W8, CH, XS)


def test_unsupported_kernel_settings_name_the_value(monkeypatch):
    call = lambda impl, config, x=X8, s=GI, **kw: jax.eval_shape(  # noqa: E731
        lambda x, w, s, xs: api.quant_matmul(x, w, w_scale=s, x_scale=xs, bits=4, group_size=32,
                                             alpha=64, implementation=impl, config=config),
        x, W4, s, XS)
    with pytest.raises(NotImplementedError, match="block_k=64 must divide group_size=32"):
        call("pallas_gpu_interpret", pallas_gpu.Config(block_k=64))
    with pytest.raises(NotImplementedError, match=r"split_k=4 must divide the 2 groups"):
        call("pallas_gpu_interpret", pallas_gpu.Config(block_k=32, split_k=4))
    with pytest.raises(NotImplementedError, match="block_k=16 must be a multiple of group_size"):
        call("pallas_tpu_interpret", pallas_tpu.Config(block_k=16))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(NotImplementedError, match=r"block_k=32 \(bits=4\).*MMA minimum"):
        call("pallas_gpu", pallas_gpu.Config(block_k=32))
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(NotImplementedError, match="block_m=8 must be a multiple of 32"):
        call("pallas_tpu", pallas_tpu.Config(block_m=8, block_k=32, block_n=48))


def test_validation_errors_name_the_setting():
    x8, w8, ch, xs = (jnp.zeros(s.shape, s.dtype) for s in (X8, W8, CH, XS))
    w4, gi, gr = jnp.zeros(W4.shape, jnp.int8), jnp.ones(GI.shape, jnp.int32), jnp.ones(GR.shape)
    xf = jnp.zeros(XF.shape, jnp.bfloat16)
    cases = [
        (dict(x=x8.astype(jnp.int4), w=w4, w_scale=ch, x_scale=xs, bits=4),
         "x.dtype=int4: int4 activations are not supported"),
        (dict(x=x8.astype(jnp.int32), w=w8, w_scale=ch, x_scale=xs), "x.dtype=int32 is not"),
        (dict(x=x8, w=w4, w_scale=gr, x_scale=xs, bits=4, group_size=48),
         "group_size=48 must divide the contraction dimension K=64"),
        (dict(x=x8, w=w8, w_scale=ch, x_scale=xs, bits=4),
         r"x shape \(16, 64\) and w shape \(64, 48\) disagree: bits=4 needs 32 rows"),
        (dict(x=x8, w=w8, w_scale=gr, x_scale=xs), r"w_scale shape \(2, 48\) must be \[N\]"),
        (dict(x=x8, w=w4, w_scale=gr, x_scale=xs, bits=4, group_size=32, alpha=8.0),
         "alpha=8.0 is only for integer w_scale"),
        (dict(x=x8, w=w4, w_scale=gi, x_scale=xs, bits=4, group_size=32),
         "alpha .* is required with integer w_scale"),
        (dict(x=x8, w=w4, w_scale=gi, x_scale=xs, bits=4, group_size=32, alpha=-1),
         "alpha=-1 must be a finite positive number"),
        (dict(x=xf, w=w4, w_scale=gi, bits=4, group_size=32, alpha=8),
         "integer w_scale .* needs int8 activations"),
        (dict(x=x8, w=w8, w_scale=ch.astype(jnp.int32), x_scale=xs, alpha=8),
         "integer w_scale needs group_size"),
        (dict(x=x8, w=w8, w_scale=ch), "x_scale is required for int8 x"),
        (dict(x=x8, w=w8, w_scale=ch, x_scale=jnp.ones((3,))),
         r"x_scale shape \(3,\) must be \[M\] = \[16\]"),
        (dict(x=xf, w=w8, w_scale=ch, x_scale=xs), "x_scale must be None for float x"),
        (dict(x=x8, w=w8, w_scale=ch, x_scale=xs, bits=3), "bits=3 must be 8 or 4"),
        (dict(x=x8, w=w8.astype(jnp.float32), w_scale=ch, x_scale=xs),
         "w.dtype=float32 must be int8"),
        (dict(x=x8, w=w8, w_scale=ch, x_scale=xs, out_dtype=jnp.int32),
         "out_dtype=.*int32.* must be a float dtype"),
        (dict(x=x8, w=w8, w_scale=ch, x_scale=xs, config=pallas_gpu.Config()),
         "needs a named implementation"),
        (dict(x=x8, w=w8, w_scale=ch, x_scale=xs, implementation="cuda"),
         "implementation='cuda' is not one of"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            api.quant_matmul(**kwargs)
    with pytest.raises(ValueError, match="K=63 must be even"):
        api.quant_matmul(jnp.zeros((2, 63), jnp.int8), w4, w_scale=ch, x_scale=xs[:2], bits=4)


def test_gmm_validation():
    x, xs = jnp.zeros((8, 64), jnp.int8), jnp.ones((8,))
    w, s = jnp.zeros((3, 64, 16), jnp.int8), jnp.ones((3, 16))
    with pytest.raises(ValueError, match=r"group_sizes shape \(2,\) must be \[E\] = \[3\]"):
        api.quant_gmm(x, w, jnp.array([1, 2]), w_scale=s, x_scale=xs)
    with pytest.raises(ValueError, match=r"w_scale shape \(16,\) must be \[E\] \+ \[N\]"):
        api.quant_gmm(x, w, jnp.array([1, 2, 3]), w_scale=s[0], x_scale=xs)
    with pytest.raises(ValueError, match="group_sizes.dtype=float32"):
        api.quant_gmm(x, w, jnp.ones((3,)), w_scale=s, x_scale=xs)


def test_x_scale_per_tensor_shapes_agree_and_empty_inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(-128, 128, (4, 32)), jnp.int8)
    w = jnp.asarray(rng.integers(-128, 128, (32, 8)), jnp.int8)
    ys = [api.quant_matmul(x, w, w_scale=jnp.ones((8,)), x_scale=xs, out_dtype=jnp.float32)
          for xs in (jnp.float32(0.5), jnp.full((1,), 0.5), jnp.full((4,), 0.5))]
    np.testing.assert_array_equal(ys[0], ys[1])
    np.testing.assert_array_equal(ys[0], ys[2])
    empty = api.quant_matmul(x[:0], w, w_scale=jnp.ones((8,)), x_scale=jnp.ones((0,)))
    assert empty.shape == (0, 8) and empty.dtype == jnp.bfloat16
    out = api.quant_gmm(x, w[None], jnp.array([0]), w_scale=jnp.ones((1, 8)),
                        x_scale=jnp.ones((4,)), implementation="pallas_gpu_interpret",
                        config=pallas_gpu.Config(block_m=16, block_n=16, block_k=32))
    assert not np.any(np.asarray(out))  # every row past the (empty) groups


def test_xla_backend_takes_no_config():
    with pytest.raises(NotImplementedError, match="takes no config"):
        xla.check(X8, W8, mode=reference.Mode(8, True, None, False), out_dtype=jnp.bfloat16,
                  grouped=False, config=pallas_gpu.Config())
