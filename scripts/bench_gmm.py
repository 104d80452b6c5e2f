"""Benchmark grouped matmul (MoE expert GEMMs): our backends next to `jax.lax.ragged_dot`,
tokamax's `ragged_dot` (when installed) and one dense GEMM of the same FLOPs, in one process.

On one H100 (the BASELINES.md shapes, bf16, even and Zipf-like groups, forward and fwd+bwd):
    python scripts/bench_gmm.py --out bench_gmm_h100.json
Sweep each kernel backend's Config.search_space (forward; slow, so one shape by default):
    python scripts/bench_gmm.py --search --shapes 16k --out bench_gmm_search.json
On CPU, MoE training and decode shapes (float32): "segments" (the CPU default), ragged_dot
("xla") and a dense GEMM of the same FLOPs; --search sweeps segments' tile size there:
    python scripts/bench_gmm.py --shapes cpu-train cpu-decode1 cpu-decode16
Tiny sizes through every backend that runs here, Pallas kernels interpreted (exercises this script):
    python scripts/bench_gmm.py --smoke

Timing (BASELINES.md): warm-up excluded; each figure issues `--calls` calls and syncs once,
median of `--repeats`. FLOPs: 2*T*K*N forward, 3x that for forward + backward. Each backend's
output is also compared once with ragged_dot (max error relative to max |ref|).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels.grouped_matmul import api  # noqa: E402
from pallas_kernels.timing import time_pipelined  # noqa: E402

# name -> (T rows = tokens * top_k, E experts, K in, N out)
SHAPES = {"16k": (16384, 64, 2048, 1024), "64k": (65536, 64, 4096, 2048),
          # CPU: 2,048 tokens x top-4 over 32 experts; decode at batch 1 and 16.
          "cpu-train": (8192, 32, 512, 256), "cpu-decode1": (4, 32, 512, 256),
          "cpu-decode16": (64, 32, 512, 256)}
SMOKE_SHAPES = {"smoke": (256, 8, 64, 32), "smoke-decode": (4, 8, 64, 32)}
KERNEL_BACKENDS = ("pallas_gpu", "triton", "pallas_tpu", "megablox", "segments")
INTERPRETED = ("pallas_gpu", "pallas_tpu", "megablox")  # run in the interpreter by --smoke


def group_sizes(rows: int, groups: int, kind: str, zipf_exponent: float, seed: int = 0):
    """'even': rows // groups each. 'zipf': sizes proportional to 1 / rank**s over a random
    expert order (s=1: the busiest of 64 experts gets ~21% of the rows)."""
    if kind == "even":
        sizes = np.full(groups, rows // groups)
    else:
        rng = np.random.default_rng(seed)
        weights = 1.0 / np.arange(1, groups + 1) ** zipf_exponent
        sizes = np.floor(weights / weights.sum() * rows).astype(np.int64)
        sizes = rng.permutation(sizes)
    sizes[np.argmax(sizes)] += rows - sizes.sum()  # exactly `rows` rows
    return jnp.asarray(sizes, jnp.int32)


def _forward(fn):
    return jax.jit(fn)


def _forward_backward(fn):
    def f(lhs, rhs, sizes, d_out):
        out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
        return out, vjp(d_out)
    return jax.jit(f)


def _tokamax_ragged_dot():
    try:
        import tokamax
    except ImportError:
        return None
    return lambda lhs, rhs, sizes: tokamax.ragged_dot(lhs, rhs, sizes)


def candidates(smoke: bool, lhs, rhs) -> dict:
    """name -> (gmm-like fn(lhs, rhs, sizes), config description)."""
    out = {"lax.ragged_dot": (lambda a, b, s: jax.lax.ragged_dot(a, b, s), "-")}
    for name in KERNEL_BACKENDS:
        if name not in api.available_implementations():
            continue
        module = api.backend_module(name)
        config = None
        if smoke and name in INTERPRETED:
            config = module.Config(block_m=32, block_n=32, block_k=32, interpret=True)
        try:
            module.check(lhs, rhs, out_dtype=lhs.dtype, config=config)
        except NotImplementedError:
            continue  # not this platform
        shown = config or module.default_config(lhs.shape[0], lhs.shape[1], rhs.shape[2],
                                                rhs.shape[0], lhs.dtype)
        out[name] = (lambda a, b, s, _n=name, _c=config: api.gmm(a, b, s, implementation=_n,
                                                                 config=_c), _describe(shown))
    tokamax_fn = None if smoke else _tokamax_ragged_dot()
    if tokamax_fn is not None:
        out["tokamax.ragged_dot"] = (tokamax_fn, "autotune/default")
    return out


def _describe(config) -> str:
    fields = dataclasses.asdict(config)
    return " ".join(f"{k.replace('block_', 'b').replace('num_', '')}={v}"
                    for k, v in fields.items() if k != "interpret" or v)


def _max_rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def run(args) -> list[dict]:
    shapes = SMOKE_SHAPES if args.smoke else {k: SHAPES[k] for k in args.shapes}
    dtype = jnp.float32 if args.smoke or jax.default_backend() == "cpu" else jnp.bfloat16
    modes = ("fwd",) if args.no_backward else ("fwd", "fwd+bwd")
    rows = []
    for shape_name, (t, e, k, n) in shapes.items():
        key = jax.random.key(0)
        lhs = jax.random.normal(key, (t, k), dtype)
        rhs = (jax.random.normal(jax.random.fold_in(key, 1), (e, k, n), jnp.float32)
               * k**-0.5).astype(dtype)
        d_out = jax.random.normal(jax.random.fold_in(key, 2), (t, n), dtype)
        dense_w = rhs[0]
        flops = 2 * t * k * n
        # The ceiling: one dense GEMM of the same FLOPs.
        dense = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
        sec = time_pipelined(dense, (lhs, dense_w), args.calls, args.repeats)
        rows.append(dict(shape=shape_name, T=t, E=e, K=k, N=n, groups="-", impl="dense GEMM",
                         mode="fwd", config="-", us=sec * 1e6, tflops=flops / sec / 1e12))
        for kind in ("even", "zipf"):
            sizes = group_sizes(t, e, kind, args.zipf)
            ref = jax.jit(jax.lax.ragged_dot)(lhs, rhs, sizes)
            for impl, (fn, shown) in candidates(args.smoke, lhs, rhs).items():
                err = _max_rel_err(jax.jit(fn)(lhs, rhs, sizes), ref)
                for mode in modes:
                    if mode == "fwd":
                        f, fargs, mult = _forward(fn), (lhs, rhs, sizes), 1
                    else:
                        f, fargs, mult = _forward_backward(fn), (lhs, rhs, sizes, d_out), 3
                    try:
                        sec = time_pipelined(f, fargs, args.calls, args.repeats)
                    except Exception as ex:  # e.g. tokamax without a backward for a case
                        print(f"  {impl} {mode} failed: {type(ex).__name__}: {ex}"[:300])
                        continue
                    rows.append(dict(shape=shape_name, T=t, E=e, K=k, N=n, groups=kind,
                                     impl=impl, mode=mode, config=shown, us=sec * 1e6,
                                     tflops=mult * flops / sec / 1e12, max_rel_err=err))
                    print(_format_row(rows[-1]), flush=True)
    return rows


def search(args) -> list[dict]:
    """Time every config of each kernel backend's search space (forward)."""
    rows = []
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    for shape_name in args.shapes:
        t, e, k, n = SHAPES[shape_name]
        lhs = jax.random.normal(jax.random.key(0), (t, k), dtype)
        rhs = jax.random.normal(jax.random.key(1), (e, k, n), dtype)
        for kind in ("even", "zipf"):
            sizes = group_sizes(t, e, kind, args.zipf)
            for name in KERNEL_BACKENDS:
                if name not in api.available_implementations():
                    continue
                module = api.backend_module(name)
                try:
                    module.check(lhs, rhs, out_dtype=dtype)
                except NotImplementedError:
                    continue
                space = module.search_space(t, k, n, e, dtype)[:args.search_limit]
                for config in space:
                    fn = jax.jit(lambda a, b, s, _c=config, _n=name: api.gmm(
                        a, b, s, implementation=_n, config=_c))
                    try:
                        sec = time_pipelined(fn, (lhs, rhs, sizes), max(args.calls // 5, 5), 1)
                    except Exception as ex:  # a config the compiler rejects (resources)
                        print(f"  {name} {_describe(config)}: {type(ex).__name__}"[:200])
                        continue
                    rows.append(dict(shape=shape_name, T=t, E=e, K=k, N=n, groups=kind,
                                     impl=name, mode="fwd", config=_describe(config),
                                     us=sec * 1e6, tflops=2 * t * k * n / sec / 1e12))
                    print(_format_row(rows[-1]), flush=True)
                best = max((r for r in rows if r["impl"] == name and r["shape"] == shape_name
                            and r["groups"] == kind), key=lambda r: r["tflops"], default=None)
                if best:
                    print(f"best {name} {shape_name} {kind}: {best['config']} "
                          f"{best['tflops']:.3g} TFLOP/s")
    return rows


def _format_row(r: dict) -> str:
    err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"
    return (f"{r['shape']:>6} {r['groups']:>5} {r['impl']:>18} {r['mode']:>7} "
            f"{r['us']:>11.1f} {r['tflops']:>8.3g} {err:>8}  {r['config']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on CPU: xla and interpret-mode Pallas kernels")
    parser.add_argument("--search", action="store_true",
                        help="sweep the kernel backends' Config search spaces (forward)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None,
                        help="default: all (search: 16k)")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of uneven groups")
    parser.add_argument("--search-limit", type=int, default=1000)
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.shapes is None:
        on_cpu = jax.default_backend() == "cpu"
        args.shapes = (["cpu-train"] if on_cpu else ["16k"]) if args.search else sorted(
            k for k in SHAPES if k.startswith("cpu") == on_cpu)
    if args.smoke:
        args.calls, args.repeats = min(args.calls, 3), min(args.repeats, 2)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}; backends: {api.available_implementations()}")
    print(f"{'shape':>6} {'group':>5} {'impl':>18} {'mode':>7} {'us/call':>11} {'TFLOP/s':>8} "
          f"{'rel err':>8}  config")
    rows = search(args) if args.search else run(args)
    if not args.search:
        print("\nsummary (TFLOP/s):")
        for r in rows:
            print(_format_row(r))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(
            device=jax.devices()[0].device_kind, platform=jax.default_backend(),
            jax=jax.__version__, date=datetime.date.today().isoformat(),
            command="python " + " ".join(sys.argv), calls=args.calls, repeats=args.repeats,
            zipf_exponent=args.zipf, rows=rows), indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
