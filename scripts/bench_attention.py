"""Benchmark block-sparse attention against jax.nn.dot_product_attention (cuDNN, XLA) and tokamax.

On one GPU (the issue's targets: H100, bf16, B=1, H=32, D=128):

    python scripts/bench_attention.py --json scripts/bench_attention.json

prints one table (time, TFLOP/s per implementation, layout, sequence length, forward or
forward+backward) and writes the same rows as JSON, then checks the targets:
dense causal at the longest S >= 85% of cuDNN's TFLOP/s (fwd and fwd+bwd), and LoZA time
<= 1.25 x density x our dense-causal time, density = LoZA blocks / causal blocks visited.
`--search` also sweeps each backend's `search_space()` for the dense causal case.

On CPU (CI-like check, tiny sizes, XLA and the interpret-mode kernels only):

    python scripts/bench_attention.py --smoke --json /tmp/bench_attention.json

Timing: warm-up excluded, then `--calls` calls issued back to back and one sync, median of
`--repeats`; short kernels are not dominated by dispatch that way. FLOPs count only allowed
(query, key) pairs: causal = 4*B*H*S^2*D/2 forward; forward+backward = 3.5x forward.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels.block_sparse_attention import api, masks  # noqa: E402
from pallas_kernels.timing import time_pipelined  # noqa: E402

FWD_BWD_FLOP_FACTOR = 3.5


def allowed_pairs(layout: masks.Layout, s_len: int) -> int:
    """Allowed (query, key) pairs, counted per 128-block from the block metadata (exact)."""
    block = 128 if s_len % 128 == 0 else s_len
    meta = layout.block_metadata(s_len, s_len, block, block)
    full = int((meta.block_state == masks.FULL).sum()) * block * block
    partial = 0
    for i, j in zip(*np.nonzero(meta.block_state == masks.PARTIAL)):
        q = np.arange(i * block, min((i + 1) * block, s_len))[:, None]
        k = np.arange(j * block, min((j + 1) * block, s_len))[None, :]
        partial += int(layout._allowed(q, k, np).sum())
    return full + partial


def make_fn(impl: str, layout: masks.Layout, mode: str, causal: bool):
    """A jitted (q, k, v) -> out (fwd) or -> grads (fwd+bwd) for one implementation."""
    if impl in ("cudnn", "xla_dpa"):
        if not causal:
            return None  # no LoZA layout in jax.nn.dot_product_attention
        attend = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                   implementation="cudnn" if impl == "cudnn" else "xla")
    elif impl == "tokamax":
        try:
            import tokamax
        except ImportError:
            return None
        if not causal:
            return None
        attend = functools.partial(tokamax.dot_product_attention, is_causal=True)
    else:
        attend = functools.partial(api.block_sparse_attention, layout=layout,
                                   implementation=impl)
    if mode == "fwd":
        return jax.jit(attend)

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def run(args) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    rows = []
    key = jax.random.PRNGKey(0)
    for s_len in args.seq:
        shape = (args.batch, s_len, args.heads, args.dim)
        q, k, v = (jax.random.normal(kk, shape, dtype) for kk in jax.random.split(key, 3))
        for layout_name in args.layouts:
            layout = masks.CausalLayout() if layout_name == "causal" else masks.LozaLayout()
            pairs = allowed_pairs(layout, s_len)
            flops_fwd = 4 * args.batch * args.heads * args.dim * pairs
            for mode in args.modes:
                flops = flops_fwd * (1 if mode == "fwd" else FWD_BWD_FLOP_FACTOR)
                for impl in args.implementations:
                    if impl == "xla_dpa" and s_len > args.max_dense_seq:
                        continue  # materialises S^2 scores
                    fn = make_fn(impl, layout, mode, layout_name == "causal")
                    if fn is None:
                        continue
                    row = dict(impl=impl, layout=layout_name, s_len=s_len, mode=mode,
                               batch=args.batch, heads=args.heads, dim=args.dim,
                               dtype=dtype.name, allowed_pairs=pairs)
                    try:
                        seconds = time_pipelined(fn, (q, k, v), args.calls, args.repeats)
                        row.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12)
                    except Exception as e:  # report and keep going: one table per process
                        row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
                    rows.append(row)
                    print(_format(row), flush=True)
    return rows


def search(args) -> list[dict]:
    """Dense causal forward at the longest S for every config of the Pallas GPU search space."""
    from pallas_kernels.block_sparse_attention import pallas_gpu

    s_len = max(args.seq)
    shape = (args.batch, s_len, args.heads, args.dim)
    q, k, v = (jax.random.normal(kk, shape, jnp.dtype(args.dtype))
               for kk in jax.random.split(jax.random.PRNGKey(0), 3))
    flops = 4 * args.batch * args.heads * args.dim * allowed_pairs(masks.CausalLayout(), s_len)
    rows = []
    for config in pallas_gpu.search_space():
        fn = jax.jit(functools.partial(pallas_gpu.block_sparse_attention,
                                       layout=masks.CausalLayout(), scale=args.dim**-0.5,
                                       config=config))
        row = dict(impl="pallas_gpu", layout="causal", s_len=s_len, mode="fwd",
                   config=str(config))
        try:
            seconds = time_pipelined(fn, (q, k, v), args.calls, args.repeats)
            row.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12)
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
        rows.append(row)
        print(_format(row), row["config"], flush=True)
    return rows


def _format(row: dict) -> str:
    head = (f"{row['impl']:>22} {row['layout']:>7} S={row['s_len']:>7} {row['mode']:>7}")
    if "error" in row:
        return f"{head}  ERROR {row['error']}"
    return f"{head} {row['ms']:10.3f} ms {row['tflops']:8.3g} TFLOP/s"


def check_targets(rows: list[dict], ours: str) -> list[str]:
    """The issue's targets, evaluated on the rows measured (skipped when a row is missing)."""
    def find(impl, layout, s_len, mode):
        return next((r for r in rows if (r["impl"], r["layout"], r["s_len"], r["mode"])
                     == (impl, layout, s_len, mode) and "ms" in r), None)

    lines = []
    s_max = max(r["s_len"] for r in rows)
    for mode in ("fwd", "fwd_bwd"):
        mine, cudnn = find(ours, "causal", s_max, mode), find("cudnn", "causal", s_max, mode)
        if mine and cudnn:
            ratio = mine["tflops"] / cudnn["tflops"]
            lines.append(f"dense causal {mode} S={s_max}: {ratio:.0%} of cuDNN "
                         f"({'PASS' if ratio >= 0.85 else 'FAIL'}, target >= 85%)")
    for s_len in sorted({r["s_len"] for r in rows}):
        for mode in ("fwd", "fwd_bwd"):
            loza, causal = find(ours, "loza", s_len, mode), find(ours, "causal", s_len, mode)
            if loza and causal:
                density = loza["allowed_pairs"] / causal["allowed_pairs"]
                bound = 1.25 * density * causal["ms"]
                lines.append(f"LoZA {mode} S={s_len}: {loza['ms']:.3f} ms vs bound {bound:.3f} ms "
                             f"(density {density:.4f}; {'PASS' if loza['ms'] <= bound else 'FAIL'})")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (xla + interpret)")
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layouts", nargs="+", default=["causal", "loza"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"])
    parser.add_argument("--implementations", nargs="+",
                        default=["pallas_gpu", "triton", "cudnn", "xla_dpa", "tokamax"])
    parser.add_argument("--max-dense-seq", type=int, default=8192,
                        help="skip XLA's dense jax.nn.dot_product_attention above this S")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--search", action="store_true",
                        help="also sweep pallas_gpu.search_space() on dense causal fwd")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq, args.heads, args.dim, args.dtype = [256], 2, 64, "float32"
        args.implementations = ["xla", "pallas_gpu_interpret", "xla_dpa"]
        args.calls, args.repeats = 1, 1
        args.layouts = ["causal", "loza"]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}", flush=True)
    rows = run(args)
    if args.search and not args.smoke:
        rows += search(args)
    ours = "pallas_gpu_interpret" if args.smoke else "pallas_gpu"
    targets = check_targets(rows, ours) if rows else []
    for line in targets:
        print(line + ("  [smoke: CPU interpreter, not meaningful]" if args.smoke else ""))
    if args.json:
        args.json.write_text(json.dumps(dict(
            device=jax.devices()[0].device_kind, platform=jax.default_backend(),
            jax=jax.__version__, argv=sys.argv[1:], rows=rows, targets=targets), indent=1))
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
