"""Model check and benchmarks for scripts/device_check.py, built on the bench_* scripts' own
functions (pipelined timing from pallas_kernels/timing.py).

Each `*_items(settings)` yields (check name, thunk, seconds estimate); a thunk returns a result
dict (measured text, value, target text, passed: None when there is no target on this device).
Targets are the GPU targets of BASELINES.md / the performance section of the roadmap.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import CausalLayout, LozaLayout
from pallas_kernels.block_sparse_attention import api as attention_api
from pallas_kernels.grouped_matmul import api as gmm_api
from pallas_kernels.timing import time_pipelined

HBM_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # by device_kind substring
LIBRARY_BACKENDS = ("cudnn", "splash", "reference")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Benchmark sizes: device-sized, or tiny for --smoke on CPU."""

    model: str = "small"
    overrides: tuple = ()  # lcjax config overrides on the preset
    dtype: str = "bfloat16"
    model_tokens: tuple = (1, 2048)  # B, S of the model forward check
    attn_seq: tuple = (8192, 16384, 32768)
    attn_shape: tuple = (1, 32, 128)  # B, H, D
    loza: tuple = (128, 1, 7)
    gmm: tuple = (16384, 64, 2048, 1024)
    train: tuple = (8, 2048, 10, 2)  # batch, seq, steps per window, windows
    decode_batch: tuple = (1, 16)
    decode_tokens: tuple = (128, 64)  # prompt, new tokens
    calls: int = 10
    repeats: int = 3


# One logical layer and no MTP head: the smoke run is about compile time, not the model.
SMOKE_SETTINGS = Settings(model="tiny", overrides=("model.num_layers=1", "model.mtp_layers=0",
                                                   "model.loza.layer_pattern=01"),
                          dtype="float32", model_tokens=(2, 64), attn_seq=(256,),
                          attn_shape=(1, 2, 32), loza=(32, 1, 2), gmm=(256, 8, 64, 32),
                          train=(2, 64, 2, 1), decode_batch=(1, 2), decode_tokens=(16, 8),
                          calls=1, repeats=1)


def our_attention() -> str:
    """Our fastest attention backend here: the first of the default order that is not a wrapped
    library kernel (cuDNN, splash) or the dense reference."""
    return next(n for n in attention_api.default_order() if n not in LIBRARY_BACKENDS)


def hbm_gbps() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in HBM_GBPS.items() if k.lower() in kind.lower()), None)


def _on_accelerator() -> bool:
    return jax.default_backend() != "cpu"


# ------------------------------------------------------------------------------ model
def model_items(st: Settings):
    from bench_decode import build_config, init_variables

    from lcjax.model import LongCatModel

    def check():
        config = build_config(st.model, st.dtype, list(st.overrides))
        variables = init_variables(config, 0)
        b, s = st.model_tokens
        ids = jnp.asarray(np.random.default_rng(0).integers(3, config.model.vocab_size, (b, s)),
                          jnp.int32)
        cfg_default = config.model
        cfg_xla = dataclasses.replace(cfg_default, attention_impl="xla")
        got = jax.jit(LongCatModel(cfg_default).apply)(variables, ids)
        want = jax.jit(LongCatModel(cfg_xla).apply)(variables, ids)
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        tol = 3e-2 if st.dtype == "bfloat16" else 1e-4
        used = cfg_default.attention_impl or f"None -> {attention_api.default_order()[0]}"
        return dict(measured=f"max rel logits diff {err:.1e} (attention_impl={used})", value=err,
                    target=f"<= {tol:g}", passed=bool(err <= tol))

    yield (f"{st.model} forward, default implementations vs attention_impl=xla "
           f"(B{st.model_tokens[0]} S{st.model_tokens[1]} {st.dtype})", "model", check, 40.0)


# ------------------------------------------------------------------------------ attention
def attention_items(st: Settings):
    from bench_attention import FWD_BWD_FLOP_FACTOR, allowed_pairs, make_fn

    b, h, d = st.attn_shape
    ours = our_attention()
    peer = "cudnn" if jax.default_backend() == "gpu" else "xla_dpa"
    dense_ms: dict = {}

    def timed(impl, layout, mode, s):
        q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.dtype(st.dtype))
                   for kk in jax.random.split(jax.random.key(s), 3))
        fn = make_fn(impl, layout, mode, isinstance(layout, CausalLayout))
        if fn is None:
            raise NotImplementedError(f"{impl}: no {type(layout).__name__} in this wrapper")
        return time_pipelined(fn, (q, k, v), st.calls, st.repeats)

    def dense(s, mode):
        pairs = allowed_pairs(CausalLayout(), s)
        flops = 4 * b * h * d * pairs * (1 if mode == "fwd" else FWD_BWD_FLOP_FACTOR)
        mine = timed(ours, CausalLayout(), mode, s)
        dense_ms[(s, mode)] = mine * 1e3
        theirs = timed(peer, CausalLayout(), mode, s)
        ratio = theirs / mine
        return dict(measured=f"{ours} {flops / mine / 1e12:.3g} TFLOP/s = {ratio:.0%} of {peer} "
                    f"({flops / theirs / 1e12:.3g})", value=ratio, target=">= 85%",
                    passed=bool(ratio >= 0.85) if peer == "cudnn" else None)

    def loza(s, mode):
        layout = LozaLayout(*st.loza)
        density = allowed_pairs(layout, s) / allowed_pairs(CausalLayout(), s)
        if (s, mode) not in dense_ms:
            dense_ms[(s, mode)] = timed(ours, CausalLayout(), mode, s) * 1e3
        ms = timed(ours, layout, mode, s) * 1e3
        bound = 1.25 * density * dense_ms[(s, mode)]
        return dict(measured=f"{ms:.3f} ms vs 1.25 x {density:.3f} x {dense_ms[(s, mode)]:.3f} ms",
                    value=ms / bound, target="<= 1.25 x density x dense",
                    passed=bool(ms <= bound) if _on_accelerator() else None)

    for mode in ("fwd", "fwd_bwd"):  # every forward first: the time box may end the section
        for s in st.attn_seq:
            yield (f"dense causal attention {mode} S={s} vs {peer}", ours,
                   lambda s=s, m=mode: dense(s, m), 15.0 if _on_accelerator() else 3.0)
            yield (f"LoZA attention {mode} S={s}", ours, lambda s=s, m=mode: loza(s, m), 10.0)


# ------------------------------------------------------------------------------ grouped matmul
def gmm_items(st: Settings):
    from bench_gmm import group_sizes

    t, e, k, n = st.gmm
    dtype = jnp.dtype(st.dtype)
    name = gmm_api.default_order()[0]

    def check(kind):
        lhs = jax.random.normal(jax.random.key(0), (t, k), dtype)
        rhs = (jax.random.normal(jax.random.key(1), (e, k, n), jnp.float32) * k**-0.5).astype(dtype)
        sizes = group_sizes(t, e, kind, 1.0)
        fn = jax.jit(lambda a, w, g: gmm_api.gmm(a, w, g))
        sec = time_pipelined(fn, (lhs, rhs, sizes), max(st.calls, 5) * 5 if _on_accelerator()
                             else 1, st.repeats)
        tflops = 2 * t * k * n / sec / 1e12
        target = kind == "even" and _on_accelerator()
        return dict(measured=f"{tflops:.3g} TFLOP/s (default -> {name})", value=tflops,
                    target=">= 500 TFLOP/s" if kind == "even" else "-",
                    passed=bool(tflops >= 500) if target else None)

    for kind in ("even", "zipf"):
        yield f"gmm fwd T{t} E{e} {k}->{n} {kind} groups", name, lambda c=kind: check(c), 15.0


# ------------------------------------------------------------------------------ train, decode
def train_items(st: Settings):
    from bench_train import measure

    def check():
        batch, seq, steps, windows = st.train
        r = measure(st.model, batch, seq, steps, windows, st.dtype,
                    "dots_with_no_batch_dims_saveable", st.overrides)
        mfu = r["mfu"]
        text = f"{r['tokens_per_s']:,.0f} tok/s, step {r['step_s'] * 1e3:.1f} ms"
        if mfu is not None:
            text = f"MFU {mfu:.1%} ({text})"
        return dict(measured=text, value=mfu, target=">= 35% MFU",
                    passed=None if mfu is None else bool(mfu >= 0.35))

    yield (f"{st.model} training MFU (batch {st.train[0]} x {st.train[1]}, {st.dtype})", "train",
           check, 90.0)


def decode_items(st: Settings):
    from bench_decode import build_config, bytes_per_step, hf_decode, init_variables, lcjax_decode

    state: dict = {}
    prompt_len, new_tokens = st.decode_tokens

    def setup():
        if not state:
            state["config"] = build_config(st.model, st.dtype, list(st.overrides))
            state["variables"] = init_variables(state["config"], 0)
        return state["config"], state["variables"]

    def check(batch):
        config, variables = setup()
        prompts = np.random.default_rng(batch).integers(
            3, config.model.vocab_size, (batch, prompt_len)).astype(np.int32)
        ours = lcjax_decode(config, variables, prompts, new_tokens, 0, None, 1)
        state[batch] = ours
        theirs = hf_decode(config, variables, prompts, new_tokens, st.dtype, "sdpa", 1, 1)
        ratio = ours["tok_s"] / theirs["tok_s"]
        return dict(measured=f"lcjax {ours['tok_s']:,.1f} tok/s = {ratio:.1f}x transformers "
                    f"({theirs['tok_s']:,.1f}, {theirs['device']})", value=ratio,
                    target=">= 20x", passed=bool(ratio >= 20) if _on_accelerator() else None)

    def roofline():
        config, _ = setup()
        if 1 not in state:
            raise NotImplementedError("needs the batch-1 decode row, which did not run")
        gbps = hbm_gbps()
        need = bytes_per_step(config, 1, prompt_len + new_tokens / 2, 0)["total"]
        achieved = need / state[1]["step_s"] / 1e9
        if gbps is None:
            return dict(measured=f"{achieved:.1f} GB/s of needed bytes (no HBM figure for "
                        f"{jax.devices()[0].device_kind})", value=None, target=">= 50%",
                        passed=None)
        frac = achieved / gbps
        return dict(measured=f"{frac:.1%} of {gbps:g} GB/s ({need / 1e6:.0f} MB/step)", value=frac,
                    target=">= 50%", passed=bool(frac >= 0.5) if _on_accelerator() else None)

    for batch in st.decode_batch:
        yield (f"{st.model} decode batch {batch} vs transformers (prompt {prompt_len}, "
               f"{new_tokens} new)", "decode", lambda b=batch: check(b), 60.0)
    if 1 in st.decode_batch:
        yield f"{st.model} decode batch 1, HBM roofline", "decode", roofline, 1.0
