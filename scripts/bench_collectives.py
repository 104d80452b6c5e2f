"""Benchmark Flash Communication's quantized all-reduce (lcjax.parallel.quantized_all_reduce,
int8 / int6 / int4) against the exact bf16 `psum`, and its quantize / dequantize kernels.

On the devices there are (GPU: all of them on one mesh axis; the partial sums are bf16):

    python scripts/bench_collectives.py --json bench_collectives.json

On CPU, 8 host devices (set before jax is imported), tiny sizes (exercises this script):

    python scripts/bench_collectives.py --smoke --json /tmp/bench_collectives.json

Per tensor size (elements each device holds) and mode: time per call, bytes each device sends
(counted by lcjax.parallel.collective_bytes from the compiled HLO), the ratio of the bf16 psum's
bytes to them, the speed-up over psum (one link speed; meaningless on CPU host devices), and the
relative L2 error against the float32 sum. The bf16 baseline counts the smaller of the compiled
module's bytes and the program's own (XLA:CPU promotes a bf16 all-reduce to float32).

Kernels (one device, the largest size): GB/s of `quantize_groups` (reads bf16 x, writes codes,
scales and zeros) and `dequantize_groups` (reads those, writes float32), next to an elementwise
bf16 pass (x + 1: read + write) as the memory-bandwidth yardstick.

Timing (BASELINES.md): warm-up excluded; `--calls` calls issued back to back and one sync,
median of `--repeats`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on 8 CPU host devices (unless --cpu-devices says)")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="run on N CPU host devices (sets XLA_FLAGS before importing jax)")
    parser.add_argument("--sizes", nargs="+", default=None,
                        help="per-device [rows, cols] names; default: all")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.calls, args.repeats = min(args.calls, 3), min(args.repeats, 2)
        args.cpu_devices = args.cpu_devices or 8
    return args


ARGS = parse_args(None if __name__ == "__main__" else [])
if ARGS.cpu_devices:  # before jax is imported, or the flag is ignored
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={ARGS.cpu_devices}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcjax.parallel.collectives import (dequantize_groups, quantize_groups,  # noqa: E402
                                        quantized_all_reduce)
from lcjax.parallel.hlo_bytes import collective_bytes  # noqa: E402
from pallas_kernels.timing import time_pipelined  # noqa: E402

# name -> per-device partial sum [rows, cols] (tokens x model width of a TP all-reduce)
SIZES = {"1k x 4k": (1024, 4096), "4k x 6k": (4096, 6144), "8k x 8k": (8192, 8192)}
SMOKE_SIZES = {"8 x 4k": (8, 4096), "64 x 4k": (64, 4096), "24 x 1000": (24, 1000)}
MODES = ("int8", "int6", "int4")


def reduce_fn(mesh, op):
    return jax.jit(jax.shard_map(op, mesh=mesh, in_specs=P("tensor"), out_specs=P()))


def run_collectives(args, mesh, sizes) -> list[dict]:
    rows, p, g = [], mesh.devices.size, args.group_size
    for name, (r, c) in sizes.items():
        x = jax.device_put(jax.random.normal(jax.random.key(0), (p * r, c), jnp.bfloat16),
                           NamedSharding(mesh, P("tensor")))
        exact = reduce_fn(mesh, lambda v: jax.lax.psum(v.astype(jnp.float32), "tensor"))(x)
        exact = np.asarray(exact, np.float64)
        psum = reduce_fn(mesh, lambda v: jax.lax.psum(v, "tensor"))
        lowered = psum.lower(x)
        base_bytes = min(collective_bytes(lowered.compile().as_text())["total"],
                         collective_bytes(lowered.as_text(dialect="hlo"))["total"])
        base_sec = None
        for mode in ("psum bf16", *MODES):
            if mode == "psum bf16":
                fn, sent = psum, base_bytes
            else:
                fn = reduce_fn(mesh, lambda v, _m=mode: quantized_all_reduce(v, "tensor", _m, g))
                sent = collective_bytes(fn.lower(x).compile().as_text())["total"]
            out = np.asarray(fn(x).astype(jnp.float32), np.float64)
            sec = time_pipelined(fn, (x,), args.calls, args.repeats)
            base_sec = base_sec or sec
            rows.append(dict(size=name, rows=r, cols=c, devices=p, mode=mode, us=sec * 1e6,
                             bytes_sent=sent, bytes_ratio=base_bytes / sent,
                             speedup=base_sec / sec,
                             rel_err=float(np.linalg.norm(out - exact) / np.linalg.norm(exact))))
            print(_format_row(rows[-1]), flush=True)
    return rows


def run_kernels(args, sizes) -> list[dict]:
    """GB/s of the codec on one device at the largest size (bytes read + written)."""
    r, c = max(sizes.values(), key=lambda s: s[0] * s[1])
    n, g = r * c, args.group_size
    x = jax.random.normal(jax.random.key(1), (n,), jnp.bfloat16)
    copy = jax.jit(lambda v: v + jnp.asarray(1, v.dtype))
    out = [dict(kernel="x + 1 (bf16 read + write)", bits="-", elements=n,
                us=time_pipelined(copy, (x,), args.calls, args.repeats) * 1e6, bytes=4 * n)]
    for bits in (8, 4):
        q, s, z = quantize_groups(x, bits, g)
        codec = n * bits // 8 + 4 * (n // g)  # codes + bf16 scales and zeros
        quant = jax.jit(lambda v, _b=bits: quantize_groups(v, _b, g))
        dequant = jax.jit(lambda *a, _b=bits: dequantize_groups(*a, _b, g))
        out.append(dict(kernel="quantize_groups", bits=bits, elements=n, bytes=2 * n + codec,
                        us=time_pipelined(quant, (x,), args.calls, args.repeats) * 1e6))
        out.append(dict(kernel="dequantize_groups", bits=bits, elements=n, bytes=codec + 4 * n,
                        us=time_pipelined(dequant, (q, s, z), args.calls, args.repeats) * 1e6))
    for row in out:
        row["gb_s"] = row["bytes"] / row["us"] / 1e3
        print(f"{row['kernel']:>28} {row['bits']:>4} {row['elements']:>10} "
              f"{row['us']:>10.1f} {row['gb_s']:>8.1f}", flush=True)
    return out


def _format_row(r: dict) -> str:
    return (f"{r['size']:>10} {r['devices']:>3} {r['mode']:>9} {r['us']:>10.1f} "
            f"{r['bytes_sent']:>12.0f} {r['bytes_ratio']:>7.2f} {r['speedup']:>7.2f} "
            f"{r['rel_err']:>9.2e}")


def main(args) -> int:
    sizes = SMOKE_SIZES if args.smoke else SIZES
    if args.sizes:
        unknown = set(args.sizes) - set(sizes)
        if unknown:
            raise SystemExit(f"--sizes {sorted(unknown)}: expected names from {list(sizes)}")
        sizes = {k: sizes[k] for k in args.sizes}
    devices = jax.devices()
    print(f"device: {devices[0].device_kind} ({jax.default_backend()}) x {len(devices)}, jax "
          f"{jax.__version__}; group size {args.group_size}, bf16 partial sums")
    rows = []
    if len(devices) > 1:
        mesh = Mesh(np.array(devices), ("tensor",))
        print(f"{'size':>10} {'P':>3} {'mode':>9} {'us/call':>10} {'B sent/dev':>12} "
              f"{'B ratio':>7} {'speedup':>7} {'rel err':>9}")
        rows = run_collectives(args, mesh, sizes)
    else:
        print("one device: no collective to time (use --cpu-devices N for host devices)")
    print(f"\n{'kernel':>28} {'bits':>4} {'elements':>10} {'us/call':>10} {'GB/s':>8}")
    kernels = run_kernels(args, sizes)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            device=devices[0].device_kind, platform=jax.default_backend(),
            devices=len(devices), jax=jax.__version__, date=datetime.date.today().isoformat(),
            command="python scripts/bench_collectives.py " + " ".join(sys.argv[1:]),
            group_size=args.group_size, calls=args.calls, repeats=args.repeats,
            rows=rows, kernels=kernels), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
