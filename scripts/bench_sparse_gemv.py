"""Benchmark the sparse GEMV (FFN down projection at decode) against the dense GEMV.

On a GPU (the Pallas Triton kernel vs XLA's dense dot; bf16; target <= 0.65x dense at s=0.5):
    python scripts/bench_sparse_gemv.py --dtype bfloat16 --out bench_sparse_gemv_gpu.json
On CPU (the jnp/XLA gather path "xla_gather" vs the dense dot; float32):
    python scripts/bench_sparse_gemv.py --out bench_sparse_gemv_cpu.json
Tiny sizes through every backend that runs here, Pallas kernels interpreted (exercises this script):
    python scripts/bench_sparse_gemv.py --smoke

Inputs: x [T, K] with a random fraction s of the K channels zero in every row (the union over
rows is what a kernel may skip), w [K, N] (the down projection [F, M]). Timing: warm-up
excluded; each figure issues `--calls` calls and syncs once, median of `--repeats`. "ratio" is
the median over repeats of time / dense time measured back to back (steadier on a shared
machine than the two medians' ratio); each backend's output is compared once with the
dense result (max error relative to max |ref|).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels.sparse_gemv import api  # noqa: E402
from pallas_kernels.timing import time_pipelined  # noqa: E402

# name -> (K = FFN width F, N = model width M)
SHAPES = {"4k": (4096, 1024), "8k": (8192, 2048), "flash": (12288, 6144)}
SMOKE_SHAPES = {"smoke": (256, 64)}


def inputs(t: int, k: int, n: int, s: float, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    active = rng.random(k) >= s
    x = rng.normal(size=(t, k)).astype(np.float32) * active
    w = rng.normal(size=(k, n)).astype(np.float32) / np.sqrt(k)
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def interleaved(fn, dense, args, calls: int, repeats: int) -> tuple[float, float]:
    """(median seconds per call of fn, median of fn/dense time ratios measured back to back):
    on a shared machine the pairs see the same load, so the ratio is steadier than either time."""
    times, ratios = [], []
    for _ in range(repeats):
        t_fn = time_pipelined(fn, args, calls, 1)
        t_dense = time_pipelined(dense, args, calls, 1)
        times.append(t_fn)
        ratios.append(t_fn / t_dense)
    return statistics.median(times), statistics.median(ratios)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--rows", default="1,4", help="decode rows T")
    ap.add_argument("--sparsities", default="0.3,0.5,0.7")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--backends", default=None, help="default: every sparse backend that runs here")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    platform = jax.default_backend()
    shapes = SMOKE_SHAPES if args.smoke else {k: SHAPES[k] for k in (args.shapes or (
        "4k,8k,flash" if platform == "gpu" else "4k,8k")).split(",")}
    if args.backends:
        backends = args.backends.split(",")
    elif args.smoke:
        backends = [b for b in api.available_implementations()
                    if b == "xla_gather" or b.endswith("_interpret")]
    else:
        backends = [b for b in api.available_implementations()
                    if b != "xla" and not b.endswith("_interpret")
                    and (b == "xla_gather" or b.startswith(f"pallas_{platform}"))]
    calls, repeats = (2, 1) if args.smoke else (args.calls, args.repeats)
    if args.smoke:
        args.rows, args.sparsities = "2", "0.5"
    dtype = jnp.dtype(args.dtype)
    rows_out = []
    print(f"{platform} ({jax.devices()[0].device_kind}), {dtype.name}, backends {backends}")
    print("| shape | T | s | backend | us | dense us | ratio | rel. err |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (k, n) in shapes.items():
        for t in (int(v) for v in args.rows.split(",")):
            for s in (float(v) for v in args.sparsities.split(",")):
                x, w = inputs(t, k, n, s, dtype)
                dense = jax.jit(lambda x, w: api.sparse_gemv(x, w, implementation="xla"))
                ref = np.asarray(dense(x, w), np.float32)
                t_dense = time_pipelined(dense, (x, w), calls, repeats)
                for b in backends:
                    fn = jax.jit(lambda x, w, b=b: api.sparse_gemv(x, w, implementation=b))
                    got = np.asarray(fn(x, w), np.float32)
                    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
                    t_b, ratio = interleaved(fn, dense, (x, w), calls, repeats)
                    row = {"shape": name, "K": k, "N": n, "T": t, "s": s, "backend": b,
                           "us": t_b * 1e6, "dense_us": t_dense * 1e6, "ratio": ratio,
                           "rel_err": err}
                    rows_out.append(row)
                    print(f"| {name} K{k} N{n} | {t} | {s:.1f} | {b} | {row['us']:.1f} | "
                          f"{row['dense_us']:.1f} | {row['ratio']:.2f} | {err:.1e} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "platform": platform,
                       "device": jax.devices()[0].device_kind, "dtype": dtype.name,
                       "calls": calls, "repeats": repeats, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
