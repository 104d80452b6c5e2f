"""Shared test body: the contract every block_sparse_attention backend must meet.

A backend's test file subclasses `AttentionContract` and sets `implementation` (e.g. "xla",
"pallas_gpu", a "<backend>_interpret" variant); pytest collects the subclass. Everything is
checked against a float64 numpy oracle written from the spec, independent of masks.py and
reference.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import api, masks

# Tolerances as data: |got - want| <= atol + rtol * max|want|, per input dtype.
TOLERANCES = {
    jnp.float32: dict(out=(2e-5, 2e-5), grad=(5e-5, 5e-5)),
    jnp.bfloat16: dict(out=(2e-2, 2e-2), grad=(3e-2, 3e-2)),
}


# Tests compile a program per case and run it on tiny inputs: on CPU, skipping LLVM's optimisation
# passes halves compile time without changing the numerics.
_COMPILER_OPTIONS = ({"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu"
                     else None)


# ---- spec oracle (float64 numpy, no code shared with the implementation) ----

def spec_allowed(layout: masks.Layout, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The layout predicate written out from its definition, for broadcast int64 positions."""
    q, k = np.asarray(q, np.int64), np.asarray(k, np.int64)
    if isinstance(layout, masks.FullLayout):
        ok = np.ones(np.broadcast_shapes(q.shape, k.shape), bool)
    elif isinstance(layout, masks.CausalLayout):
        ok = k <= q
    elif isinstance(layout, masks.SlidingWindowLayout):
        ok = (k <= q) & (q - k < layout.window)
    elif isinstance(layout, masks.LozaLayout):  # spec §4, verbatim
        bs = layout.block_size
        ok = (k <= q) & ((k // bs < layout.sink_blocks)
                         | (k // bs >= q // bs - (layout.local_blocks - 1)))
    elif isinstance(layout, masks.BlockMaskLayout):
        table = np.array(layout.mask, bool)
        qb, kb = np.broadcast_arrays(q // layout.block_size, k // layout.block_size)
        ok = np.zeros(qb.shape, bool)
        for idx in np.ndindex(qb.shape):
            i, j = qb[idx], kb[idx]
            ok[idx] = 0 <= i < table.shape[0] and 0 <= j < table.shape[1] and table[i, j]
        ok &= k <= q
    elif isinstance(layout, masks.AndLayout):
        ok = np.logical_and.reduce([spec_allowed(m, q, k) for m in layout.layouts])
    elif isinstance(layout, masks.OrLayout):
        ok = np.logical_or.reduce([spec_allowed(m, q, k) for m in layout.layouts])
    else:
        raise TypeError(layout)
    return np.broadcast_to(ok & (k >= 0), np.broadcast_shapes(q.shape, k.shape))


def oracle(q, k, v, mask_bst, scale, d_out, d_lse):
    """Forward (out, lse) and analytic gradients (dq, dk, dv) in float64."""
    q, k, v, d_out, d_lse = (np.asarray(x, np.float64) for x in (q, k, v, d_out, d_lse))
    b_size, s_len, n_heads, _ = q.shape
    rep = n_heads // k.shape[2]
    out = np.zeros(q.shape[:3] + v.shape[3:])
    lse = np.full((b_size, n_heads, s_len), -np.inf)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(b_size):
        for h in range(n_heads):
            g = h // rep
            s = np.where(mask_bst[b], scale * q[b, :, h] @ k[b, :, g].T, -np.inf)
            rows = mask_bst[b].any(axis=1)
            m = np.where(rows, s.max(axis=1, initial=-np.inf), 0.0)
            p = np.exp(s - m[:, None])
            denom = p.sum(axis=1)
            p = p / np.where(rows, denom, 1.0)[:, None]
            o = p @ v[b, :, g]
            out[b, :, h] = o
            lse[b, h] = np.where(rows, m + np.log(np.where(rows, denom, 1.0)), -np.inf)
            do = d_out[b, :, h]
            dp = do @ v[b, :, g].T
            ds = p * (dp - (do * o).sum(axis=1, keepdims=True)) + p * d_lse[b, h][:, None]
            dq[b, :, h] = scale * ds @ k[b, :, g]
            dk[b, :, g] += scale * ds.T @ q[b, :, h]
            dv[b, :, g] += p.T @ do
    return out, lse, dq, dk, dv


# ---- cases ----

@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    layout: masks.Layout
    batch: int = 2
    s_len: int = 24
    t_len: int = 24
    heads: int = 4
    groups: int = 4
    d_k: int = 16
    d_v: int = 16
    dtype: Any = jnp.float32
    scale: float | None = None
    # rng -> (q_positions, kv_positions, q_segment_ids, kv_segment_ids), any may be None
    extras: Callable[[np.random.Generator, "Case"], tuple] | None = None


def _packed(rng, case):
    """Three packed sequences per row; positions restart at each segment (LoZA sees each alone)."""
    lens = (9, 21, case.s_len - 30)
    seg = np.repeat(np.arange(3), lens)[None].repeat(case.batch, 0)
    pos = np.concatenate([np.arange(n) for n in lens])[None].repeat(case.batch, 0)
    return pos, pos, seg, seg


def _decode_cache(rng, case):
    """Queries at the end of a ring-buffer cache whose slots hold shuffled positions, some empty."""
    kv = np.stack([rng.permutation(case.t_len) for _ in range(case.batch)])
    kv = np.where(rng.random(kv.shape) < 0.2, -1, kv)
    q = np.arange(case.t_len - case.s_len, case.t_len)[None].repeat(case.batch, 0)
    return q, kv, None, None


def _partly_empty(rng, case):
    """Row 0: some queries in a segment with no keys. Row 1: every cache slot empty."""
    q_seg = np.zeros((case.batch, case.s_len), np.int64)
    q_seg[0, ::3] = 7
    kv_seg = np.zeros((case.batch, case.t_len), np.int64)
    kv_pos = np.arange(case.t_len)[None].repeat(case.batch, 0)
    kv_pos[1] = -1
    q_pos = np.arange(case.s_len)[None].repeat(case.batch, 0)
    return q_pos, kv_pos, q_seg, kv_seg


_BLOCKS = tuple(tuple(bool(x) for x in row) for row in
                np.random.default_rng(3).random((5, 5)) < 0.6)

CASES = (
    Case("window_gqa", masks.SlidingWindowLayout(7), s_len=33, t_len=33, groups=2),
    Case("loza_mqa_dk_ne_dv", masks.LozaLayout(4, 1, 2), s_len=45, t_len=45, groups=1, d_k=24,
         d_v=8),
    Case("block_mask", masks.BlockMaskLayout(_BLOCKS, 8), s_len=40, t_len=40, heads=2, groups=1),
    Case("composed", masks.LozaLayout(4, 1, 3) | masks.SlidingWindowLayout(2), s_len=30,
         t_len=30, heads=2, groups=2),
    Case("full_s_ne_t", masks.FullLayout(), s_len=5, t_len=19, scale=0.3),
    Case("packed_segments_loza", masks.LozaLayout(4, 1, 2), s_len=45, t_len=45, groups=2,
         extras=_packed),
    Case("chunk_cache_window", masks.SlidingWindowLayout(9), s_len=3, t_len=21, groups=2,
         extras=_decode_cache),
    Case("causal_mla_prefill_192_128", masks.CausalLayout(), s_len=17, t_len=17, heads=2,
         groups=2, d_k=192, d_v=128, scale=0.07),
    Case("mla_absorbed_decode_loza", masks.LozaLayout(4, 1, 2), s_len=1, t_len=29, heads=4,
         groups=1, d_k=576, d_v=512, extras=_decode_cache),
    Case("fully_masked_rows", masks.CausalLayout(), s_len=12, t_len=12, extras=_partly_empty),
    Case("bf16_loza_gqa", masks.LozaLayout(4, 1, 2), s_len=40, t_len=40, groups=2,
         dtype=jnp.bfloat16),
    Case("loza_1100_block128", masks.LozaLayout(), batch=1, s_len=1100, t_len=1100, heads=1,
         groups=1, d_k=8, d_v=8),
)


def make_inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = ((case.batch, case.s_len, case.heads, case.d_k),
              (case.batch, case.t_len, case.groups, case.d_k),
              (case.batch, case.t_len, case.groups, case.d_v))
    q, k, v = (jnp.asarray(rng.standard_normal(s), case.dtype) for s in shapes)
    d_out = jnp.asarray(rng.standard_normal(shapes[0][:3] + (case.d_v,)), case.dtype)
    d_lse = jnp.asarray(rng.standard_normal((case.batch, case.heads, case.s_len)), jnp.float32)
    extras = case.extras(rng, case) if case.extras else (None,) * 4
    kwargs = dict(zip(("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids"),
                      (None if x is None else jnp.asarray(x, jnp.int32) for x in extras)))
    return (q, k, v), kwargs, (d_out, d_lse)


def oracle_mask(case: Case, kwargs) -> np.ndarray:
    def get(name, n):
        x = kwargs[name]
        return np.arange(n)[None].repeat(case.batch, 0) if x is None else np.asarray(x)
    q_pos, kv_pos = get("q_positions", case.s_len), get("kv_positions", case.t_len)
    mask = spec_allowed(case.layout, q_pos[:, :, None], kv_pos[:, None, :])
    if kwargs["q_segment_ids"] is not None:
        mask = mask & (np.asarray(kwargs["q_segment_ids"])[:, :, None]
                       == np.asarray(kwargs["kv_segment_ids"])[:, None, :])
    return mask


def _assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    atol, rtol = tol
    err = np.max(np.abs(got - want), initial=0.0)
    bound = atol + rtol * np.max(np.abs(want), initial=0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


class AttentionContract:
    """Subclass with `implementation = "<name>"`; pytest runs every test per backend."""

    implementation: str = ""
    # Kernel backends walk the block plan: they must never read a key block with no visible key.
    visits_only_active_blocks: bool = False
    # case name -> regex: the backend must refuse that case with NotImplementedError naming it.
    unsupported_cases: dict[str, str] = {}

    def attend(self, q, k, v, **kwargs):
        return api.block_sparse_attention(q, k, v, implementation=self.implementation, **kwargs)

    def _compiled(self, case: Case):
        """Jitted forward + vjp for a case, cached per (test class, case): positions and segment
        ids are traced arguments, as in a model's jitted decode step."""
        cache = type(self).__dict__.get("_cache")
        if cache is None:
            cache = {}
            setattr(type(self), "_cache", cache)
        if case.name not in cache:
            @functools.partial(jax.jit, compiler_options=_COMPILER_OPTIONS)
            def forward_and_vjp(q, k, v, d_out, d_lse, arrays):
                attend = lambda q, k, v: self.attend(q, k, v, layout=case.layout,
                                                     scale=case.scale, return_lse=True, **arrays)
                outputs, vjp = jax.vjp(attend, q, k, v)
                return outputs, vjp((d_out, d_lse))
            cache[case.name] = forward_and_vjp
        return cache[case.name]

    def _run(self, case: Case, seed: int = 0):
        (q, k, v), kwargs, (d_out, d_lse) = make_inputs(case, seed)
        outputs, grads = self._compiled(case)(q, k, v, d_out, d_lse, kwargs)
        return (q, k, v), kwargs, (d_out, d_lse), outputs, grads

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_oracle(self, case):
        if case.name in self.unsupported_cases:
            with pytest.raises(NotImplementedError, match=self.unsupported_cases[case.name]):
                self._run(case)
            return
        (q, k, v), kwargs, (d_out, d_lse), (out, lse), grads = self._run(case)
        assert out.dtype == case.dtype and lse.dtype == jnp.float32
        assert out.shape == (case.batch, case.s_len, case.heads, case.d_v)
        assert lse.shape == (case.batch, case.heads, case.s_len)
        mask = oracle_mask(case, kwargs)
        scale = case.d_k**-0.5 if case.scale is None else case.scale
        want = oracle(q, k, v, mask, scale, d_out, d_lse)
        tol = TOLERANCES[case.dtype]
        _assert_close(out, want[0], tol["out"], "out")
        finite = np.isfinite(want[1])
        np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
        _assert_close(np.asarray(lse)[finite], want[1][finite], tol["out"], "lse")
        for name, got, ref in zip(("dq", "dk", "dv"), grads, want[2:]):
            assert got.dtype == case.dtype
            _assert_close(got, ref, tol["grad"], name)

    def test_fully_masked_rows_are_zero_with_finite_grads(self):
        case = next(c for c in CASES if c.name == "fully_masked_rows")
        _, kwargs, _, (out, lse), (dq, dk, dv) = self._run(case)
        empty_bs = ~oracle_mask(case, kwargs).any(axis=-1)
        assert empty_bs.sum() >= case.s_len + 4  # row 1 entirely, row 0 every third query
        assert np.all(np.asarray(out)[empty_bs] == 0)
        assert np.all(np.asarray(lse).transpose(0, 2, 1)[empty_bs] == -np.inf)
        for g in (dq, dk, dv):
            assert np.all(np.isfinite(np.asarray(g)))
        assert np.all(np.asarray(dq)[empty_bs] == 0)
        assert np.all(np.asarray(dk)[1] == 0) and np.all(np.asarray(dv)[1] == 0)

    @pytest.mark.parametrize("name", ["window_gqa", "bf16_loza_gqa"])
    def test_deterministic(self, name):
        """The same compiled program on the same inputs gives bitwise equal results."""
        case = next(c for c in CASES if c.name == name)
        first, second = self._run(case), self._run(case)
        for a, b in zip(jax.tree.leaves(first[3:]), jax.tree.leaves(second[3:])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def test_this_backend_ran(self, monkeypatch):
        calls = []
        real = api.REGISTRY.implementations[self.implementation]

        def spy(*args, **kwargs):
            calls.append(self.implementation)
            return real(*args, **kwargs)

        monkeypatch.setitem(api.REGISTRY.implementations, self.implementation, spy)
        q = jax.ShapeDtypeStruct((1, 4, 2, 8), jnp.float32)
        jax.eval_shape(lambda q: self.attend(q, q, q, layout=masks.CausalLayout()), q)
        assert calls == [self.implementation]

    def test_inactive_key_blocks_are_never_read(self):
        """NaN in key blocks no query may see must not reach any result (dense code would give
        NaN through 0 * NaN in P @ V)."""
        if not self.visits_only_active_blocks:
            pytest.skip(f"{self.implementation} computes densely")
        case = Case("causal_short_q", masks.CausalLayout(), batch=1, s_len=32, t_len=160,
                    heads=2, groups=1, d_k=16, d_v=16)
        (q, k, v), kwargs, (d_out, d_lse) = make_inputs(case)
        poison = (jnp.arange(case.t_len) >= 128)[None, :, None, None]
        k_bad, v_bad = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
        outputs, grads = self._compiled(case)(q, k_bad, v_bad, d_out, d_lse, kwargs)
        want_outputs, want_grads = self._compiled(case)(q, k, v, d_out, d_lse, kwargs)
        for got, want in zip(jax.tree.leaves((outputs, grads)),
                             jax.tree.leaves((want_outputs, want_grads))):
            got, want = np.asarray(got), np.asarray(want)
            if got.shape[1:2] == (case.t_len,):  # dk, dv: the poisoned rows are never written
                got, want = got[:, :128], want[:, :128]
            np.testing.assert_array_equal(got, want)
