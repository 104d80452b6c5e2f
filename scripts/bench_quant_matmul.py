"""Benchmark quantized GEMMs (pallas_kernels.quant_matmul) against XLA's bf16 GEMM and XLA's
int8 `lax.dot`, in one process.

On one GPU (the issue's shapes: 8192^3, and decode M in {1, 16} x 8192 x 28672):

    python scripts/bench_quant_matmul.py --json scripts/bench_quant_matmul.json

prints one table (time, TOP/s, weight GB/s, speed-up over XLA bf16 and over XLA int8 per mode
and implementation) and writes the same rows as JSON, then checks the targets: W8A8 at 8192^3
>= 1.6x the bf16 GEMM; W4A16 and W4A8 at the decode shapes >= 3x the bf16 GEMM; Integer Scale
W4A8 faster than float-scale W4A8. `--search` sweeps each kernel backend's `search_space()` for
one mode and shape (slow). On CPU (tiny sizes, "xla" and the interpret-mode Pallas kernel):

    python scripts/bench_quant_matmul.py --smoke --json /tmp/bench_quant_matmul.json

Timing (BASELINES.md): warm-up excluded, then `--calls` calls issued back to back and one sync,
median of `--repeats`. Inputs are already quantized (int8 activations with their per-token
scale, packed int4 weights): activation quantization is not timed. Each row's output is compared
once with the "xla" reference of its mode (max error relative to max |ref|).
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
from pallas_kernels.quant_matmul import api, reference  # noqa: E402
from pallas_kernels.timing import time_pipelined  # noqa: E402

# name -> (M, K, N)
SHAPES = {"8192^3": (8192, 8192, 8192), "decode_m1": (1, 8192, 28672),
          "decode_m16": (16, 8192, 28672)}
SMOKE_SHAPES = {"smoke": (16, 256, 256), "smoke_m1": (1, 256, 256)}
GROUP = 128
ALPHA = 2.0**10  # techniques.md §2's candidate default amplifier
# mode -> (bits, int8 activations, group size, integer scales)
MODES = {
    "w8a8": (8, True, None, False),
    "w4a8_odyssey": (4, True, None, False),
    "w4a8_int_g128": (4, True, GROUP, True),
    "w4a8_float_g128": (4, True, GROUP, False),
    "w4a16_g128": (4, False, GROUP, False),
    "w4a16": (4, False, None, False),
}
# which modes run at which shapes (the targets; the rest for context)
SHAPE_MODES = {"8192^3": ("w8a8", "w4a8_int_g128", "w4a8_float_g128"),
               "decode": tuple(MODES)}
KERNEL_BACKENDS = ("pallas_gpu", "triton", "pallas_tpu")


def make_inputs(mode: str, m: int, k: int, n: int, seed: int = 0) -> dict:
    """Quantized operands of `mode` (random, in range) as quant_matmul kwargs."""
    bits, a8, group, integer = MODES[mode]
    rng = np.random.default_rng(seed)
    wmax = 8 if bits == 4 else 128
    w_q = jnp.asarray(rng.integers(-wmax, wmax, (k, n), dtype=np.int8))
    scales = (n,) if group is None else (k // group, n)
    if integer:  # s_int = round(alpha * s) with s ~ 0.002: a few units, inside the int32 bound
        w_scale = jnp.asarray(rng.integers(1, 8, scales), jnp.int32)
        assert reference.accumulator_bound(k, bits, 8) < 2**31
    else:
        w_scale = jnp.asarray(rng.uniform(0.5, 2.0, scales) / (wmax * 64), jnp.float32)
    if a8:
        x = jnp.asarray(rng.integers(-128, 128, (m, k), dtype=np.int8))
        x_scale = jnp.asarray(rng.uniform(0.5, 2.0, (m,)) / 127, jnp.float32)
    else:
        x, x_scale = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16), None
    return dict(x=x, w=reference.pack_int4(w_q) if bits == 4 else w_q, w_scale=w_scale,
                x_scale=x_scale, bits=bits, group_size=group,
                alpha=ALPHA if integer else None)


def _describe(config) -> str:
    if config is None:
        return "-"
    return " ".join(f"{k.replace('block_', 'b').replace('num_', '')}={v}"
                    for k, v in dataclasses.asdict(config).items())


def _mode_of(kwargs) -> reference.Mode:
    return reference.Mode(kwargs["bits"], kwargs["x"].dtype == jnp.int8, kwargs["group_size"],
                          kwargs["alpha"] is not None)


def implementations(smoke: bool) -> list[str]:
    if smoke:
        return ["xla", "pallas_gpu_interpret"]
    return ["xla"] + [n for n in KERNEL_BACKENDS if n in api.available_implementations()]


def _call(kwargs, impl, config=None):
    arrays = {k: kwargs[k] for k in ("x", "w", "w_scale", "x_scale")}
    static = {k: kwargs[k] for k in ("bits", "group_size", "alpha")}
    fn = jax.jit(lambda a: api.quant_matmul(**a, **static, implementation=impl, config=config))
    return fn, (arrays,)


def _max_rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _row(shape, m, k, n, mode, impl, sec, weight_bytes, config="-", **extra) -> dict:
    return dict(shape=shape, M=m, K=k, N=n, mode=mode, impl=impl, config=config, us=sec * 1e6,
                tops=2 * m * k * n / sec / 1e12, weight_gbs=weight_bytes / sec / 1e9, **extra)


def run(args) -> list[dict]:
    shapes = SMOKE_SHAPES if args.smoke else {s: SHAPES[s] for s in args.shapes}
    rows = []
    for shape, (m, k, n) in shapes.items():
        rng = np.random.default_rng(1)
        x_bf16 = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        w_bf16 = jnp.asarray(rng.standard_normal((k, n)) * k**-0.5, jnp.bfloat16)
        x_i8 = jnp.asarray(rng.integers(-128, 128, (m, k), dtype=np.int8))
        w_i8 = jnp.asarray(rng.integers(-128, 128, (k, n), dtype=np.int8))
        bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
        int8 = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32))
        base = {}
        for name, fn, fargs, wbytes in (("xla bf16", bf16, (x_bf16, w_bf16), 2 * k * n),
                                        ("xla int8 lax.dot", int8, (x_i8, w_i8), k * n)):
            sec = time_pipelined(fn, fargs, args.calls, args.repeats)
            base[name] = sec
            rows.append(_row(shape, m, k, n, "baseline", name, sec, wbytes))
            print(_format(rows[-1], base), flush=True)
        modes = SHAPE_MODES["decode" if m <= 64 else "8192^3"]
        if args.modes:
            modes = [mo for mo in modes if mo in args.modes]
        for mode in modes:
            kwargs = make_inputs(mode, m, k, n)
            wbytes = kwargs["w"].size + kwargs["w_scale"].size * 4
            ref = None
            for impl in implementations(args.smoke):
                module = api.backend_module(impl)
                interpret = impl.endswith("_interpret")
                try:
                    module.check(kwargs["x"], kwargs["w"], mode=_mode_of(kwargs),
                                 out_dtype=jnp.dtype(jnp.bfloat16), grouped=False,
                                 interpret=interpret)
                except NotImplementedError as e:
                    print(f"  {shape} {mode} {impl}: skipped ({e})"[:200])
                    continue
                fn, fargs = _call(kwargs, impl)
                out = fn(*fargs)
                if ref is None:
                    ref = out if impl == "xla" else _call(kwargs, "xla")[0](*fargs)
                sec = time_pipelined(fn, fargs, args.calls, args.repeats)
                config = None
                if module.Config is not None:
                    config = module.default_config(m, k, n, _mode_of(kwargs))
                rows.append(_row(shape, m, k, n, mode, impl, sec, wbytes, _describe(config),
                                 max_rel_err=_max_rel_err(out, ref),
                                 vs_bf16=base["xla bf16"] / sec,
                                 vs_int8=base["xla int8 lax.dot"] / sec))
                print(_format(rows[-1], base), flush=True)
    return rows


def search(args) -> list[dict]:
    """Time every config of each kernel backend's search space for --search-mode, per shape."""
    rows = []
    mode = args.search_mode
    for shape in args.shapes:
        m, k, n = SHAPES[shape]
        kwargs = make_inputs(mode, m, k, n)
        for impl in implementations(False)[1:]:
            module = api.backend_module(impl)
            space = module.search_space(m, k, n, _mode_of(kwargs))[:args.search_limit]
            for config in space:
                fn, fargs = _call(kwargs, impl, config)
                try:
                    sec = time_pipelined(fn, fargs, max(args.calls // 5, 5), 1)
                except Exception as ex:  # a config the compiler rejects (resources)
                    print(f"  {impl} {_describe(config)}: {type(ex).__name__}"[:200])
                    continue
                rows.append(_row(shape, m, k, n, mode, impl, sec, kwargs["w"].size,
                                 _describe(config)))
                print(_format(rows[-1], {}), flush=True)
            best = min((r for r in rows if r["impl"] == impl and r["shape"] == shape),
                       key=lambda r: r["us"], default=None)
            if best:
                print(f"best {impl} {mode} {shape}: {best['config']} {best['us']:.1f} us")
    return rows


def check_targets(rows: list[dict]) -> list[str]:
    """The issue's targets on the rows measured: the best kernel backend per mode and shape."""
    kernels = [r for r in rows if r["impl"] not in ("xla",) and r["mode"] != "baseline"]

    def best(shape, mode):
        cands = [r for r in kernels if r["shape"] == shape and r["mode"] == mode]
        return max(cands, key=lambda r: r["vs_bf16"], default=None)

    lines = []

    def target(what, row, ratio, goal):
        if row is None:
            lines.append(f"{what}: not measured")
        else:
            lines.append(f"{what}: {ratio:.2f}x ({row['impl']}) "
                         f"{'PASS' if ratio >= goal else 'FAIL'}, target >= {goal}x")

    r = best("8192^3", "w8a8")
    target("W8A8 8192^3 vs XLA bf16", r, r and r["vs_bf16"], 1.6)
    for shape in ("decode_m1", "decode_m16"):
        for mode in ("w4a16_g128", "w4a8_int_g128"):
            r = best(shape, mode)
            target(f"{mode} {shape} vs XLA bf16", r, r and r["vs_bf16"], 3.0)
        for impl in {r["impl"] for r in kernels}:
            by = {r["mode"]: r for r in kernels if r["shape"] == shape and r["impl"] == impl}
            if "w4a8_int_g128" in by and "w4a8_float_g128" in by:
                speedup = by["w4a8_float_g128"]["us"] / by["w4a8_int_g128"]["us"]
                lines.append(f"Integer Scale vs float-scale W4A8, {shape}, {impl}: "
                             f"{speedup:.2f}x {'PASS' if speedup > 1 else 'FAIL'}, target > 1x")
    return lines


def _format(r: dict, base: dict) -> str:
    err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"
    vs = (f"{r['vs_bf16']:>6.2f}x {r['vs_int8']:>6.2f}x" if "vs_bf16" in r
          else f"{'-':>7} {'-':>7}")
    return (f"{r['shape']:>10} {r['mode']:>16} {r['impl']:>20} {r['us']:>10.1f} "
            f"{r['tops']:>8.1f} {r['weight_gbs']:>8.0f} {vs} {err:>8}  {r['config']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on CPU: xla and the interpret-mode Pallas GPU kernel")
    parser.add_argument("--search", action="store_true",
                        help="sweep the kernel backends' Config search spaces (one mode)")
    parser.add_argument("--search-mode", choices=sorted(MODES), default="w8a8")
    parser.add_argument("--search-limit", type=int, default=1000)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None,
                        help="default: all (search: 8192^3 for w8a8, else decode_m16)")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=None)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = ([("8192^3" if args.search_mode == "w8a8" else "decode_m16")]
                       if args.search else list(SHAPES))
    if args.smoke:
        args.calls, args.repeats, args.search = min(args.calls, 3), min(args.repeats, 2), False

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}; backends: {api.available_implementations()}")
    print(f"{'shape':>10} {'mode':>16} {'impl':>20} {'us/call':>10} {'TOP/s':>8} {'wGB/s':>8} "
          f"{'/bf16':>7} {'/int8':>7} {'rel err':>8}  config")
    rows = search(args) if args.search else run(args)
    targets = [] if args.search or args.smoke else check_targets(rows)
    for line in targets:
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            device=jax.devices()[0].device_kind, platform=jax.default_backend(),
            jax=jax.__version__, date=datetime.date.today().isoformat(),
            command="python scripts/bench_quant_matmul.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            calls=args.calls, repeats=args.repeats, rows=rows, targets=targets), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
