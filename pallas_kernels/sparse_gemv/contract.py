"""Shared test body: the contract every sparse_gemv backend must meet.

A backend's test file subclasses `SparseGemvContract`, sets `implementation` ("xla",
"pallas_gpu_interpret", ...), optionally `config` (small blocks for tiny shapes) and `marker`
(what its traced program must contain), and `sparse` (whether it reads only the active rows);
pytest collects the subclass. Results are checked against a float64 numpy oracle written from
reference.py's docstring (no shared code). A sparse backend is also run on weights whose inactive
rows are NaN: reading any of them would poison the output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_gemv import api

# |got - want| <= tol * max|want| per dtype.
TOLERANCES = {"float32": 2e-5, "bfloat16": 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    t: int
    k: int
    n: int
    density: float  # fraction of input channels nonzero in some row
    dtype: str = "float32"

    def __str__(self):
        return self.name


CASES = (
    Case("decode_half", 1, 96, 64, 0.5),
    Case("rows4_third", 4, 128, 64, 0.3),
    Case("k_tail", 3, 100, 32, 0.5),  # K not a multiple of the row step
    Case("all_zero", 2, 64, 32, 0.0),
    Case("all_active", 2, 64, 32, 1.0),
    Case("bf16", 2, 64, 32, 0.5, "bfloat16"),
)


def case_named(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def make_inputs(case: Case, poison: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x [T, K], w [K, N], active [K]) float32; with poison, inactive rows of w are NaN."""
    rng = np.random.default_rng(abs(hash(case.name)) % 2**32)
    active = rng.random(case.k) < case.density
    x = rng.normal(size=(case.t, case.k)) * active
    x[0, active] *= 1.0 + (rng.random(active.sum()) < 0.5)  # rows differ; each active k has x != 0
    w = rng.normal(size=(case.k, case.n))
    x = np.asarray(jnp.asarray(x, case.dtype).astype(jnp.float32))  # representable in dtype
    w = np.asarray(jnp.asarray(w, case.dtype).astype(jnp.float32))
    if poison:
        w = np.where(active[:, None], w, np.nan)
    return x.astype(np.float32), w.astype(np.float32), active


def oracle(x: np.ndarray, w: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Σ over the active channels only, in float64."""
    x64, w64 = x.astype(np.float64)[:, active], w.astype(np.float64)[active]
    return x64 @ w64


@functools.lru_cache(maxsize=None)
def _jitted(implementation: str, config):
    return jax.jit(lambda x, w: api.sparse_gemv(x, w, implementation=implementation, config=config))


def run(implementation: str, case: Case, config=None, *, poison: bool = False, jaxpr: bool = False):
    x, w, _ = make_inputs(case, poison)
    args = (jnp.asarray(x, case.dtype), jnp.asarray(w, case.dtype))
    fn = _jitted(implementation, config)
    return str(jax.make_jaxpr(fn)(*args)) if jaxpr else fn(*args)


def assert_matches(case: Case, got, want) -> None:
    got64 = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert got64.shape == want.shape
    tol = TOLERANCES[case.dtype] * max(np.abs(want).max(), 1e-30)
    err = np.abs(got64 - want).max() if want.size else 0.0
    assert err <= tol, f"{case.name}: max |err| {err:.3g} > {tol:.3g}"


class SparseGemvContract:
    implementation: str = "xla"
    config: Any = None
    marker: str | None = None  # None: no kernel call at all
    sparse: bool = True  # reads only the active rows (the NaN-poison test applies)

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_matches_oracle(self, case):
        got = run(self.implementation, case, self.config)
        assert got.shape == (case.t, case.n) and got.dtype == jnp.dtype(case.dtype)
        x, w, active = make_inputs(case)
        assert_matches(case, got, oracle(x, w, active))

    @pytest.mark.parametrize("name", ["decode_half", "rows4_third", "all_zero"])
    def test_reads_only_active_rows(self, name):
        case = case_named(name)
        if not self.sparse:
            pytest.skip(f"{self.implementation} is dense")
        got = run(self.implementation, case, self.config, poison=True)
        x, w, active = make_inputs(case, poison=True)
        assert np.all(np.isfinite(np.asarray(got)))
        assert_matches(case, got, oracle(x, w, active))

    def test_deterministic(self):
        case = case_named("rows4_third")
        a = run(self.implementation, case, self.config)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(run(self.implementation, case, self.config)))

    def test_this_backend_ran(self):
        text = run(self.implementation, case_named("decode_half"), self.config, jaxpr=True)
        if self.marker is None:
            assert "pallas_call" not in text
        else:
            assert self.marker in text
