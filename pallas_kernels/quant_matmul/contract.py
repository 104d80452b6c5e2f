"""Shared test body: the contract every quant_matmul backend must meet.

A backend's test file subclasses `QuantMatmulContract`, sets `implementation` ("xla",
"pallas_gpu_interpret", ...) and optionally `config` (small blocks for tiny shapes) and
`unsupported` ({case name: regex of the NotImplementedError}); pytest collects the subclass.
Results are checked against an int64 / float64 numpy oracle written from reference.py's
docstring (no shared code), and against the "xla" reference:
- "exact" cases use power-of-two scales and float32 output, so every float step is exact and the
  result must EQUAL the integer oracle (the int32 accumulator, bit for bit);
- A8 per-channel and Integer Scale cases must equal the reference bit for bit at any scales
  (same float32 epilogue, in the same order); float-group and A16 cases meet TOLERANCES.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant_matmul import api, reference

# |got - want| <= tol * max|want| per output dtype (float-group and A16 modes).
TOLERANCES = {"float32": 2e-5, "bfloat16": 1e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    m: int
    k: int
    n: int
    bits: int = 8
    a8: bool = True
    group_size: int | None = None
    integer_scale: bool = False
    x_dtype: str = "float32"  # A16 activations
    out_dtype: str = "float32"
    exact: bool = False  # power-of-two scales: float steps exact, result == integer oracle
    per_tensor: bool = False  # x_scale [] instead of [M]
    expert_rows: tuple[int, ...] | None = None  # quant_gmm group_sizes (None: quant_matmul)
    alpha: float = 1024.0

    @property
    def grouped(self) -> bool:
        return self.expert_rows is not None

    @property
    def bit_exact_vs_reference(self) -> bool:
        return self.exact or (self.a8 and (self.group_size is None or self.integer_scale))

    def __str__(self):
        return self.name


CASES = (
    Case("w8a8_exact", 5, 64, 48, exact=True, per_tensor=True),
    Case("w8a8_bf16_out", 20, 96, 40, out_dtype="bfloat16"),
    Case("w4a8_odyssey_exact", 5, 128, 48, bits=4, exact=True),
    Case("w4a8_odyssey", 3, 64, 40, bits=4),
    Case("w4a8_float_g32_exact", 5, 128, 48, bits=4, group_size=32, exact=True),
    Case("w4a8_float_g32", 17, 128, 40, bits=4, group_size=32),
    Case("w4a8_int_g32_exact", 5, 128, 48, bits=4, group_size=32, integer_scale=True,
         exact=True, alpha=1.0),
    Case("w4a8_int_g64", 17, 128, 40, bits=4, group_size=64, integer_scale=True,
         out_dtype="bfloat16"),
    Case("w8a8_int_g32", 5, 64, 48, group_size=32, integer_scale=True, per_tensor=True),
    Case("w4a16_g32", 5, 128, 40, bits=4, a8=False, group_size=32),
    Case("w4a16_bf16", 3, 64, 48, bits=4, a8=False, x_dtype="bfloat16", out_dtype="bfloat16"),
    Case("w8a16_f16", 5, 64, 40, a8=False, x_dtype="float16"),
    Case("gmm_w4a8_int_g32", 24, 64, 40, bits=4, group_size=32, integer_scale=True,
         expert_rows=(7, 0, 12)),  # an empty expert and 5 tail rows
    Case("gmm_w8a8_exact", 21, 64, 48, exact=True, expert_rows=(4, 9, 3)),
    Case("gmm_w4a16_g32_bf16", 20, 64, 40, bits=4, a8=False, group_size=32,
         x_dtype="bfloat16", out_dtype="bfloat16", expert_rows=(0, 11, 6)),
)


def case_named(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def make_inputs(case: Case) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(kwargs for quant_matmul / quant_gmm, the same as int64 / float64 numpy for the oracle)."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    e = len(case.expert_rows) if case.grouped else 1
    lead = (e,) if case.grouped else ()
    wmax = 8 if case.bits == 4 else 128
    w = rng.integers(-wmax, wmax, size=lead + (case.k, case.n))
    groups = None if case.group_size is None else case.k // case.group_size
    s_shape = lead + ((case.n,) if groups is None else (groups, case.n))

    def pow2(shape):
        return 2.0 ** rng.integers(-3, 4, size=shape)

    if case.integer_scale:
        w_scale = rng.integers(1, 33 if case.exact else 2000, size=s_shape)
    elif case.exact:
        w_scale = pow2(s_shape)
    else:
        w_scale = rng.uniform(0.5, 2.0, size=s_shape) / (wmax * 8)
    if case.a8:
        x = rng.integers(-128, 128, size=(case.m, case.k))
        xs_shape = () if case.per_tensor else (case.m,)
        x_scale = pow2(xs_shape) if case.exact else rng.uniform(0.5, 2.0, size=xs_shape) / 127
    else:
        x = rng.standard_normal((case.m, case.k))
        x = np.asarray(jnp.asarray(x, case.x_dtype).astype(jnp.float32), np.float64)
        x_scale = None
    w_q = jnp.asarray(w, jnp.int8)
    kwargs = dict(
        x=jnp.asarray(x, jnp.int8 if case.a8 else case.x_dtype),
        w=reference.pack_int4(w_q) if case.bits == 4 else w_q,
        w_scale=jnp.asarray(w_scale, jnp.int32 if case.integer_scale else jnp.float32),
        x_scale=None if x_scale is None else jnp.asarray(x_scale, jnp.float32),
        bits=case.bits, group_size=case.group_size,
        alpha=case.alpha if case.integer_scale else None, out_dtype=jnp.dtype(case.out_dtype))
    if case.grouped:
        kwargs["group_sizes"] = jnp.asarray(case.expert_rows, jnp.int32)
    w_scale_np = np.asarray(kwargs["w_scale"], np.float64)
    oracle_in = dict(x=x, w=w, w_scale=w_scale_np,
                     x_scale=None if x_scale is None else np.broadcast_to(
                         np.asarray(kwargs["x_scale"], np.float64), (case.m,)))
    return kwargs, oracle_in


def _oracle_dense(case: Case, x, w, w_scale, x_scale) -> np.ndarray:
    x, w = np.asarray(x), np.asarray(w)
    if not case.a8:
        scale = w_scale if case.group_size is None else np.repeat(w_scale, case.group_size, 0)
        return x @ (w * scale)
    if case.group_size is None:
        return (x.astype(np.int64) @ w.astype(np.int64)) * x_scale[:, None] * w_scale[None, :]
    g = case.group_size
    parts = [x[:, i:i + g].astype(np.int64) @ w[i:i + g].astype(np.int64)
             for i in range(0, case.k, g)]
    if case.integer_scale:
        acc = sum(p * w_scale[j].astype(np.int64) for j, p in enumerate(parts))
        assert np.abs(acc).max() < 2**31  # the cases stay inside the int32 bound
        return acc * x_scale[:, None] / case.alpha
    return sum(p * w_scale[j] for j, p in enumerate(parts)) * x_scale[:, None]


def oracle(case: Case, oracle_in: dict) -> np.ndarray:
    """float64 [M, N] from the spec; quant_gmm: per expert on its rows, 0 past the groups."""
    x, w, w_scale, x_scale = (oracle_in[k] for k in ("x", "w", "w_scale", "x_scale"))
    if not case.grouped:
        return _oracle_dense(case, x, w, w_scale, x_scale)
    out = np.zeros((case.m, case.n))
    start = 0
    for e, size in enumerate(case.expert_rows):
        rows = slice(start, min(start + size, case.m))
        if size:
            out[rows] = _oracle_dense(case, x[rows], w[e], w_scale[e],
                                      None if x_scale is None else x_scale[rows])
        start += size
    return out


def tail_rows(case: Case) -> slice:
    return slice(min(sum(case.expert_rows), case.m), case.m)


_STATIC = ("bits", "group_size", "alpha", "out_dtype")


@functools.lru_cache(maxsize=None)
def _jitted(implementation: str, config, case: Case):
    kwargs, _ = make_inputs(case)
    static = {k: kwargs[k] for k in _STATIC}
    fn = api.quant_gmm if case.grouped else api.quant_matmul
    return jax.jit(lambda arrays: fn(**arrays, **static, implementation=implementation,
                                     config=config))


def run(implementation: str, case: Case, config=None, *, jaxpr: bool = False):
    """The case through `implementation`, jitted once per (implementation, config, case); with
    jaxpr=True, the traced program's text instead."""
    kwargs, _ = make_inputs(case)
    arrays = {k: v for k, v in kwargs.items() if k not in _STATIC}
    fn = _jitted(implementation, config, case)
    return str(jax.make_jaxpr(fn)(arrays)) if jaxpr else fn(arrays)


def assert_matches(case: Case, got, want) -> None:
    got64 = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert got64.shape == want.shape
    if case.exact:
        np.testing.assert_array_equal(got64, want)
        return
    tol = TOLERANCES[case.out_dtype] * max(np.abs(want).max(), 1e-30)
    err = np.abs(got64 - want).max()
    assert err <= tol, f"{case.name}: max |err| {err:.3g} > {tol:.3g}"


class QuantMatmulContract:
    implementation: str = "xla"
    config: Any = None
    unsupported: dict[str, str] = {}
    # what this backend's traced program contains (None: no kernel call at all, the reference)
    marker: str | None = None

    def _run(self, case):
        if case.name in self.unsupported:
            with pytest.raises(NotImplementedError, match=self.unsupported[case.name]):
                run(self.implementation, case, self.config)
            pytest.skip(f"{self.implementation} refuses {case.name} (asserted)")
        return run(self.implementation, case, self.config)

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_matches_oracle_and_reference(self, case):
        got = self._run(case)
        assert got.shape == (case.m, case.n) and got.dtype == jnp.dtype(case.out_dtype)
        _, oracle_in = make_inputs(case)
        assert_matches(case, got, oracle(case, oracle_in))
        if self.implementation != "xla" and case.bit_exact_vs_reference:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(run("xla", case)))
        if case.grouped:
            assert np.all(np.asarray(got)[tail_rows(case)] == 0)

    def test_deterministic(self):
        case = case_named("w4a8_float_g32")
        if case.name in self.unsupported:
            pytest.skip("unsupported")
        np.testing.assert_array_equal(np.asarray(self._run(case)), np.asarray(self._run(case)))

    @pytest.mark.parametrize("name", ["w8a8_exact", "gmm_w4a8_int_g32"])
    def test_this_backend_ran(self, name):
        case = case_named(name)
        text = run(self.implementation, case, self.config, jaxpr=True)
        if self.marker is None:
            assert "pallas_call" not in text and "callback" not in text
        else:
            assert self.marker in text
