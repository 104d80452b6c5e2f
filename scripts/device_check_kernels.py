"""Kernel checks for scripts/device_check.py: every registered backend of each op against an
independent reference on this device (forward, and gradients where the op is differentiable).

Each `*_items(shapes)` yields (check name, thunk, seconds estimate); a thunk returns a result dict
(measured text, value, target text, passed) or raises NotImplementedError when the backend
declines the case (reported as 'unavailable: reason'). Backends are every name in each op's public
`KNOWN_IMPLEMENTATIONS`, so new ones are picked up; one whose import failed declines with its
reason.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import (CausalLayout, LozaLayout, attention_reference,
                                                   paged_decode_attention, paged_decode_reference)
from pallas_kernels.block_sparse_attention import api as attention_api
from pallas_kernels.block_sparse_attention import decode as decode_api
from pallas_kernels.grouped_matmul import api as gmm_api
from pallas_kernels.grouped_matmul import gmm_reference
from pallas_kernels.quant_matmul import api as quant_api
from pallas_kernels.quant_matmul import unpack_int4
from pallas_kernels.sparse_gemv import api as gemv_api

# max |got - want| / max |want| allowed, by the kernel's input dtype.
REL_TOL = {"float32": 2e-3, "bfloat16": 3e-2}
INTERPRET = "_interpret"
# Backends that wrap a library kernel rather than defining the op ("reference" is the definition).
NOT_KERNELS = ("reference",)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Problem sizes for the kernel checks: device-sized, or tiny for --smoke on CPU."""

    dtype: str = "bfloat16"
    attn: tuple = (1, 2048, 8, 128)  # B, S, H, D
    loza: tuple = (128, 1, 7)  # block, sink blocks, local blocks
    decode: tuple = (4, 4096, 16, 16)  # B, T, H, page
    gmm: tuple = (4096, 16, 512, 256)  # T, E, K, N
    quant: tuple = (64, 1024, 512)  # M, K, N
    sparse_gemv: tuple = (1, 12288, 6144)  # T, K (FFN width), N (model width); s = 0.5


SMOKE_SHAPES = Shapes(dtype="float32", attn=(1, 256, 2, 32), loza=(32, 1, 2),
                      decode=(2, 128, 4, 16), gmm=(256, 8, 64, 32), quant=(16, 256, 256),
                      sparse_gemv=(2, 128, 64))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"shape {got.shape} != reference {want.shape}")
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _verdict(errors: dict, dtype: str) -> dict:
    tol = REL_TOL[dtype]
    worst = max(errors.values())
    text = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    return dict(measured=f"max rel err {text}", value=worst, target=f"<= {tol:g}",
                passed=bool(worst <= tol))


def runnable_here(name: str) -> bool:
    """Names this platform is expected to run: its default order, the references and, on CPU,
    the interpret variants. Others may still decline (NotImplementedError) or fail to lower."""
    platform = jax.default_backend()
    if name.endswith(INTERPRET):
        return platform == "cpu"
    return name in ("xla", "reference") or name in attention_api.default_order(platform) \
        or name in gmm_api.default_order(platform) or name in quant_api.default_order(platform) \
        or name in gemv_api.default_order(platform)


def names_to_check(names) -> list[str]:
    """Interpret variants run only on CPU: on an accelerator the compiled kernel is the check."""
    cpu = jax.default_backend() == "cpu"
    return [n for n in names if n not in NOT_KERNELS and (cpu or not n.endswith(INTERPRET))]


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ------------------------------------------------------------------------------ attention
def attention_items(shapes: Shapes):
    b, s, h, d = shapes.attn
    dtype = jnp.dtype(shapes.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, d_out = (_normal(kk, (b, s, h, d), dtype) for kk in keys)
    layouts = {"causal": CausalLayout(), "loza": LozaLayout(*shapes.loza)}
    want = {}

    def reference(layout_name):
        if layout_name not in want:  # float32 inputs: the definition, not a rounding of it
            f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
            fn = lambda q, k, v: attention_reference(q, k, v, layout=layouts[layout_name])  # noqa
            out, vjp = jax.vjp(fn, *f32[:3])
            want[layout_name] = (out, *vjp(f32[3]))
        return want[layout_name]

    def check(name, layout_name):
        layout = layouts[layout_name]

        @jax.jit
        def run(q, k, v, d_out):
            fn = lambda q, k, v: attention_api.block_sparse_attention(  # noqa: E731
                q, k, v, layout=layout, implementation=name)
            out, vjp = jax.vjp(fn, q, k, v)
            return (out, *vjp(d_out))

        got = run(q, k, v, d_out)
        errors = {part: rel_err(g, w) for part, g, w in
                  zip(("out", "dq", "dk", "dv"), got, reference(layout_name))}
        return _verdict(errors, shapes.dtype)

    for name in names_to_check(attention_api.KNOWN_IMPLEMENTATIONS):
        for layout_name in layouts:
            yield (f"attention {name} {layout_name} fwd+bwd B{b} S{s} H{h} D{d} {shapes.dtype}",
                   name, lambda n=name, l=layout_name: check(n, l), 10.0)


def decode_items(shapes: Shapes):
    """Absorbed-MLA paged decode: one kv head, keys [latent | rope] (576), values the latent."""
    b, t, h, page = shapes.decode
    dtype = jnp.dtype(shapes.dtype)
    d_k, d_v = 576, 512
    pages_per_seq = t // page
    rng = np.random.default_rng(0)
    keys = jax.random.split(jax.random.key(1), 2)
    q = _normal(keys[0], (b, 1, h, d_k), dtype)
    k_pages = _normal(keys[1], (b * pages_per_seq, page, 1, d_k), dtype)
    tables = jnp.asarray(rng.permutation(b * pages_per_seq).reshape(b, pages_per_seq), jnp.int32)
    lengths = jnp.asarray(rng.integers(t // 2, t + 1, b), jnp.int32)
    layouts = {"causal": CausalLayout(), "loza": LozaLayout(*shapes.loza)}

    def check(name, layout_name):
        kwargs = dict(layout=layouts[layout_name], scale=d_k**-0.5, v_head_dim=d_v)
        want = paged_decode_reference(q.astype(jnp.float32), k_pages.astype(jnp.float32), None,
                                      tables, lengths, **kwargs)
        got = jax.jit(lambda q, kp: paged_decode_attention(q, kp, None, tables, lengths,
                                                           implementation=name, **kwargs))(
            q, k_pages)
        return _verdict({"out": rel_err(got, want)}, shapes.dtype)

    for name in names_to_check(decode_api.KNOWN_IMPLEMENTATIONS):
        for layout_name in layouts:
            yield (f"paged decode {name} {layout_name} B{b} T{t} H{h} page {page} {shapes.dtype}",
                   name, lambda n=name, l=layout_name: check(n, l), 5.0)


# ------------------------------------------------------------------------------ grouped matmul
def gmm_items(shapes: Shapes):
    from bench_gmm import group_sizes

    t, e, k, n = shapes.gmm
    dtype = jnp.dtype(shapes.dtype)
    keys = jax.random.split(jax.random.key(2), 3)
    lhs = _normal(keys[0], (t, k), dtype)
    rhs = (_normal(keys[1], (e, k, n), jnp.float32) * k**-0.5).astype(dtype)
    d_out = _normal(keys[2], (t, n), dtype)
    sizes = group_sizes(t, e, "zipf", 1.0)
    f32 = [x.astype(jnp.float32) for x in (lhs, rhs, d_out)]
    out, vjp = jax.vjp(lambda a, w: gmm_reference(a, w, sizes), f32[0], f32[1])
    want = (out, *vjp(f32[2]))

    def check(name):
        @jax.jit
        def run(lhs, rhs, d_out):
            out, vjp = jax.vjp(lambda a, w: gmm_api.gmm(a, w, sizes, implementation=name), lhs, rhs)
            return (out, *vjp(d_out))

        got = run(lhs, rhs, d_out)
        return _verdict({part: rel_err(g, w) for part, g, w in
                         zip(("out", "d_lhs", "d_rhs"), got, want)}, shapes.dtype)

    for name in names_to_check(gmm_api.KNOWN_IMPLEMENTATIONS):
        yield (f"gmm {name} fwd+bwd T{t} E{e} {k}->{n} zipf {shapes.dtype}", name,
               lambda n=name: check(n), 5.0)


# ------------------------------------------------------------------------------ quantized matmul
def quant_items(shapes: Shapes):
    from bench_quant_matmul import MODES, make_inputs

    m, k, n = shapes.quant

    def dequantized(kw) -> tuple[np.ndarray, np.ndarray]:
        """float64 (x_deq, w_deq) from the quantized operands (integer scales: s_int / alpha)."""
        w_q = np.asarray(unpack_int4(kw["w"]) if kw["bits"] == 4 else kw["w"], np.float64)
        scale = np.asarray(kw["w_scale"], np.float64)
        if kw["alpha"] is not None:
            scale = scale / kw["alpha"]
        if scale.ndim == 2:  # [K / group, N]
            scale = np.repeat(scale, kw["group_size"], axis=0)
        x = np.asarray(kw["x"].astype(jnp.float32), np.float64)
        if kw["x_scale"] is not None:
            x = x * np.asarray(kw["x_scale"], np.float64)[:, None]
        return x, w_q * scale

    def check(name, mode):
        kw = make_inputs(mode, m, k, n)
        arrays = {a: kw[a] for a in ("x", "w", "w_scale", "x_scale")}
        static = {a: kw[a] for a in ("bits", "group_size", "alpha")}
        got = jax.jit(lambda a: quant_api.quant_matmul(**a, **static, implementation=name))(arrays)
        x, w = dequantized(kw)
        return _verdict({"out": rel_err(got, x @ w)}, "bfloat16")  # bf16 output

    def check_grouped(name, mode):
        """Four experts (one empty) with their own weights and scales; rows sorted by expert."""
        experts = [make_inputs(mode, m, k, n, seed=e) for e in range(4)]
        sizes = np.array([m // 2, 0, m // 4, m - m // 2 - m // 4])
        kw = dict(experts[0], w=jnp.stack([e["w"] for e in experts]),
                  w_scale=jnp.stack([e["w_scale"] for e in experts]))
        static = {a: kw[a] for a in ("bits", "group_size", "alpha")}
        got = jax.jit(lambda x, w, ws, xs, g: quant_api.quant_gmm(
            x, w, g, w_scale=ws, x_scale=xs, **static, implementation=name))(
            kw["x"], kw["w"], kw["w_scale"], kw["x_scale"], jnp.asarray(sizes, jnp.int32))
        x, _ = dequantized(experts[0])
        rows = np.repeat(np.arange(4), sizes)
        want = np.stack([x[i] @ dequantized(experts[e])[1] for i, e in enumerate(rows)])
        return _verdict({"out": rel_err(got, want)}, "bfloat16")

    for name in names_to_check(quant_api.KNOWN_IMPLEMENTATIONS):
        for mode in MODES:
            yield (f"quant_matmul {name} {mode} M{m} K{k} N{n}", name,
                   lambda n=name, md=mode: check(n, md), 4.0)
            yield (f"quant_gmm {name} {mode} M{m} K{k} N{n} E4", name,
                   lambda n=name, md=mode: check_grouped(n, md), 4.0)


# ------------------------------------------------------------------------------ sparse GEMV
def sparse_gemv_items(shapes: Shapes):
    """Each backend against float64 at s = 0.5 (half the channels zero in every row); compiled
    sparse backends also timed against the dense "xla" GEMV (target <= 0.65x on a GPU)."""
    from pallas_kernels.timing import time_pipelined

    t, k, n = shapes.sparse_gemv
    rng = np.random.default_rng(0)
    x64 = rng.normal(size=(t, k)) * (rng.random(k) >= 0.5)
    w64 = rng.normal(size=(k, n)) / np.sqrt(k)
    x, w = jnp.asarray(x64, shapes.dtype), jnp.asarray(w64, shapes.dtype)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)

    def run(name, config=None):
        return jax.jit(lambda x, w: gemv_api.sparse_gemv(x, w, implementation=name, config=config))

    def check(name):
        return _verdict({"out": rel_err(run(name)(x, w).astype(jnp.float32), want)}, shapes.dtype)

    def speed(name):
        dense = time_pipelined(run("xla"), (x, w), 50, 5)
        ratio = time_pipelined(run(name), (x, w), 50, 5) / dense
        # A few split-K / row-step settings around the default: how far the default is from tuned.
        cfgs = getattr(gemv_api.backend_module(name), "tuning_probe", lambda *a: ())(t, k, n)
        tried = [(time_pipelined(run(name, c), (x, w), 20, 3) / dense, c) for c in cfgs]
        top = min(tried, key=lambda p: p[0]) if tried else None
        best = f"; best of {len(tried)} probed {top[0]:.2f}x at {top[1]}" if tried else ""
        return dict(measured=f"{ratio:.2f}x dense GEMV (default config){best}", value=ratio,
                    target="<= 0.65", passed=bool(ratio <= 0.65))

    for name in names_to_check(gemv_api.KNOWN_IMPLEMENTATIONS):
        yield (f"sparse_gemv {name} T{t} K{k} N{n} s=0.5 {shapes.dtype}", name,
               lambda n=name: check(n), 2.0)
        if name.startswith("pallas_") and not name.endswith(INTERPRET):
            yield (f"sparse_gemv {name} speed vs dense T{t} K{k} N{n} s=0.5", name,
                   lambda n=name: speed(n), 4.0)
