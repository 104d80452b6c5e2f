"""Shared test body: the contract every grouped_matmul backend must meet.

A backend's test file subclasses `GmmContract`, setting `implementation` and `config` (an
interpret-mode Config with small blocks, so T <= 256 still spans many tiles, group boundaries
inside tiles and partial k/n blocks); pytest collects the subclass. Results are checked against
float64 numpy loops (reference.gmm_numpy / tgmm_numpy) and `jax.lax.ragged_dot` at HIGHEST.
Cases of one shape differ only in group_sizes, a traced argument: one compile serves them all.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import api, reference

# Tolerances as data: |got - want| <= atol + rtol * max|want|, keyed by input dtype.
TOLERANCES = {
    "float32": dict(out=(1e-5, 1e-5), grad=(1e-5, 2e-5)),
    "bfloat16": dict(out=(0.0, 1e-2), grad=(0.0, 2e-2)),
}

# On CPU, skipping LLVM's optimisation passes halves compile time without changing numerics.
COMPILER_OPTIONS = ({"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu"
                    else None)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    group_sizes: tuple[int, ...]
    shape: tuple[int, int, int] = (192, 64, 96)  # T, K, N
    dtype: str = "float32"
    out_dtype: str | None = None  # preferred_element_type

    @property
    def compile_key(self) -> tuple:
        return self.shape, len(self.group_sizes), self.dtype, self.out_dtype


CASES = (
    Case("even", (24,) * 8),
    Case("uneven_empty_tail", (0, 37, 5, 0, 50, 1, 0, 60)),  # 39 tail rows must be 0
    Case("all_groups_empty", (0,) * 8),
    Case("one_group_all_rows", (0, 0, 192, 0, 0, 0, 0, 0)),
    Case("zipf", (75, 37, 25, 18, 15, 12, 10, 0)),
    Case("overfull_clipped", (100, 0, 100, 100, 0, 0, 0, 0)),  # sum 300 > T: clipped to T
    Case("bf16_uneven_empty_tail", (0, 37, 5, 0, 50, 1, 0, 60), dtype="bfloat16"),
    Case("bf16_zipf", (75, 37, 25, 18, 15, 12, 10, 0), dtype="bfloat16"),
    Case("bf16_in_f32_out", (3, 0, 61, 17, 80, 0, 2, 21), dtype="bfloat16", out_dtype="float32"),
    Case("odd_dims", (30, 0, 40), shape=(77, 40, 24)),  # partial k / n / row blocks, 7 tail rows
)


def case_named(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def make_inputs(case: Case, seed: int = 0):
    """lhs [T, K], rhs [G, K, N], group_sizes [G], d_out [T, N] as numpy (rounded to dtype)."""
    rng = np.random.default_rng(seed)
    (t, k, n), g = case.shape, len(case.group_sizes)
    dtype = jnp.dtype(case.dtype)
    out_dtype = jnp.dtype(case.out_dtype or case.dtype)
    lhs = np.asarray(jnp.asarray(rng.standard_normal((t, k)), dtype))
    rhs = np.asarray(jnp.asarray(rng.standard_normal((g, k, n)), dtype))
    d_out = np.asarray(jnp.asarray(rng.standard_normal((t, n)), out_dtype))
    return lhs, rhs, np.asarray(case.group_sizes, np.int32), d_out


def oracle(lhs, rhs, group_sizes, d_out):
    """Forward and the two gradients in float64. d_out goes through the kernels' input dtype,
    as the backward pass rounds it there."""
    d_out = np.asarray(jnp.asarray(d_out, lhs.dtype), np.float64)
    out = reference.gmm_numpy(lhs, rhs, group_sizes)
    d_lhs = reference.gmm_numpy(d_out, np.swapaxes(np.asarray(rhs, np.float64), 1, 2),
                                group_sizes)
    d_rhs = reference.tgmm_numpy(lhs, d_out, group_sizes)
    return out, d_lhs, d_rhs


def assert_close(got, want, tol, what: str) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    atol, rtol = tol
    err = np.max(np.abs(got - want), initial=0.0)
    bound = atol + rtol * np.max(np.abs(want), initial=0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def tail_rows(case: Case) -> slice:
    return slice(min(sum(case.group_sizes), case.shape[0]), case.shape[0])


class GmmContract:
    """Subclass with `implementation = "<name>"` and `config`; pytest runs every test per
    backend."""

    implementation: str = ""
    config: Any = None

    def _compiled(self, case: Case):
        """Jitted forward + VJP, cached per (test class, shape, dtype)."""
        cache = type(self).__dict__.get("_cache")
        if cache is None:
            cache = {}
            setattr(type(self), "_cache", cache)
        if case.compile_key not in cache:
            @functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
            def forward_and_vjp(lhs, rhs, group_sizes, d_out):
                def f(lhs, rhs):
                    return api.gmm(lhs, rhs, group_sizes, preferred_element_type=case.out_dtype,
                                   implementation=self.implementation, config=self.config)
                out, vjp = jax.vjp(f, lhs, rhs)
                return out, vjp(d_out)
            cache[case.compile_key] = forward_and_vjp
        return cache[case.compile_key]

    def _run(self, case: Case, seed: int = 0):
        lhs, rhs, group_sizes, d_out = make_inputs(case, seed)
        out, (d_lhs, d_rhs) = self._compiled(case)(lhs, rhs, group_sizes, d_out)
        return (lhs, rhs, group_sizes, d_out), (out, d_lhs, d_rhs)

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_numpy_and_ragged_dot(self, case):
        (lhs, rhs, group_sizes, d_out), got = self._run(case)
        out_dtype = jnp.dtype(case.out_dtype or case.dtype)
        assert got[0].dtype == out_dtype
        assert got[1].dtype == got[2].dtype == jnp.dtype(case.dtype)
        tol = TOLERANCES[case.dtype]
        for name, g, want in zip(("out", "d_lhs", "d_rhs"), got, oracle(*make_inputs(case))):
            assert_close(g, want, tol["out" if name == "out" else "grad"], f"{name} vs numpy")
        # And against jax's own ragged_dot and its autodiff.
        out, vjp = jax.vjp(lambda a, b: reference.gmm_reference(
            a, b, jnp.asarray(group_sizes), preferred_element_type=case.out_dtype),
            jnp.asarray(lhs), jnp.asarray(rhs))
        for name, g, want in zip(("out", "d_lhs", "d_rhs"), got, (out, *vjp(jnp.asarray(d_out)))):
            assert_close(g, want, tol["out" if name == "out" else "grad"], f"{name} vs ragged_dot")

    @pytest.mark.parametrize("name", ["uneven_empty_tail", "all_groups_empty", "odd_dims"])
    def test_rows_past_the_groups_are_exactly_zero(self, name):
        case = case_named(name)
        _, (out, d_lhs, d_rhs) = self._run(case)
        tail = tail_rows(case)
        assert tail.stop > tail.start
        assert np.all(np.asarray(out)[tail] == 0) and np.all(np.asarray(d_lhs)[tail] == 0)
        empty = [g for g, s in enumerate(case.group_sizes) if s == 0]
        assert np.all(np.asarray(d_rhs)[empty] == 0)

    @pytest.mark.parametrize("name", ["uneven_empty_tail", "bf16_zipf"])
    def test_deterministic(self, name):
        """The same compiled program on the same inputs gives bitwise equal results."""
        first, second = self._run(case_named(name))[1], self._run(case_named(name))[1]
        for a, b in zip(first, second):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def test_tgmm_matches_numpy(self):
        case = case_named("bf16_uneven_empty_tail")
        lhs, _, group_sizes, d_out = make_inputs(case)
        d_out = d_out.astype(lhs.dtype)
        got = jax.jit(lambda a, b, s: api.tgmm(a, b, s, implementation=self.implementation,
                                                config=self.config),
                      compiler_options=COMPILER_OPTIONS)(lhs, d_out, group_sizes)
        assert got.dtype == lhs.dtype
        assert_close(got, reference.tgmm_numpy(lhs, d_out, group_sizes),
                     TOLERANCES[case.dtype]["grad"], "tgmm")

    def test_this_backend_ran(self, monkeypatch):
        """Forward and backward go through this backend's own gmm (twice) and tgmm."""
        module = api.backend_module(self.implementation)
        calls = []
        for fn_name in ("gmm", "tgmm"):
            real = getattr(module, fn_name)

            def spy(*args, _real=real, _name=fn_name, **kwargs):
                calls.append((_name, kwargs.get("transpose_rhs", False)))
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, fn_name, spy)
        lhs = jax.ShapeDtypeStruct((64, 32), jnp.float32)
        rhs = jax.ShapeDtypeStruct((4, 32, 48), jnp.float32)
        sizes = jax.ShapeDtypeStruct((4,), jnp.int32)

        def loss(lhs, rhs, sizes):
            return api.gmm(lhs, rhs, sizes, implementation=self.implementation,
                           config=self.config).sum()

        jax.eval_shape(jax.grad(loss, argnums=(0, 1)), lhs, rhs, sizes)
        assert sorted(calls) == [("gmm", False), ("gmm", True), ("tgmm", False)]
