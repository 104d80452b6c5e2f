"""Training throughput and MFU for a model preset (default `small`, ~1B params) on this device.

    python scripts/bench_train.py                      # small, bf16, batch 8 x 2048, on the GPU
    python scripts/bench_train.py --smoke              # tiny shapes on CPU (checks the script)
    python scripts/bench_train.py --cpu-default        # the embedded default run's step on CPU

--cpu-default also reports the fraction of the FLOPs the step executes that are useful model
FLOPs (lcjax.train.flops: activated experts only, causal attention), from XLA's cost analysis
(see lcjax/train/cost.py for how loops are counted).

Synthetic token batches (the data pipeline is not what is measured); the real jitted
`train_step` with its sharded state, timed over many steps with one sync per window after a
warm-up. Prints a table and writes JSON (tokens/s, step time, model FLOPs/token, MFU).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.config_io import load_config, resolve_config_path
from lcjax.train.__main__ import DEFAULT_CONFIGS
from lcjax.parallel import make_mesh, rules_for, use_parallelism
from lcjax.train.flops import device_peak_flops, train_flops_per_token
from lcjax.train.state import batch_sharding, create_optimizer, init_state, state_shardings
from lcjax.train.step import train_step


def synthetic_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict:
    ids = rng.integers(3, vocab, size=(batch, seq + 1), dtype=np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((batch, seq), np.float32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


def measure(preset, batch_size: int, seq: int, steps: int, windows: int, dtype: str,
            remat: str, extra_overrides=()) -> dict:
    """Compile the sharded train step for `preset` (a name or a tuple of layered configs), then
    time `windows` windows of `steps` steps (one sync per window); the median step time gives
    tokens/s and MFU."""
    overrides = [f"model.dtype={dtype}", f"model.remat_policy={remat}",
                 f"data.seq_len={seq}", f"data.global_batch={batch_size}",
                 "train.steps=1000", *extra_overrides]
    presets = (preset,) if isinstance(preset, str) else tuple(preset)
    config = load_config([resolve_config_path(p) for p in presets], overrides)
    mesh = make_mesh(config.mesh)
    tx = create_optimizer(config)
    shardings = state_shardings(config, tx, mesh)
    rows = batch_sharding(mesh, rules_for(config))
    state = init_state(config, tx, mesh)
    rng = np.random.default_rng(0)
    batch = {k: jax.device_put(v, rows) for k, v in
             synthetic_batch(rng, batch_size, seq, config.model.vocab_size).items()}
    with use_parallelism(mesh, config.parallel):
        step = jax.jit(functools.partial(train_step, config=config, tx=tx),
                       in_shardings=(shardings, rows), out_shardings=(shardings, None), donate_argnums=0)
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t
        times, zero = [], 0.0
        for _ in range(windows):
            t = time.perf_counter()
            for _ in range(steps):
                state, metrics = step(state, batch)
            zero = float(jax.device_get(metrics["zero_share"]))
            times.append((time.perf_counter() - t) / steps)
    step_s = float(np.median(times))
    tokens = batch_size * seq
    flops_tok = train_flops_per_token(config.model, seq, zero)
    peak = device_peak_flops()
    tok_s = tokens / step_s
    mfu = None if peak is None else flops_tok * tok_s / (peak * jax.device_count())
    return {"preset": "+".join(presets), "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "jax": jax.__version__, "python": platform.python_version(), "batch": batch_size,
            "seq": seq, "dtype": dtype, "remat": remat, "compile_s": compile_s,
            "step_s": step_s, "tokens_per_s": tok_s, "model_flops_per_token": flops_tok,
            "zero_share": zero, "mfu": mfu, "loss": float(jax.device_get(metrics["loss"]))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", default="dots_with_no_batch_dims_saveable")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--cpu-default", action="store_true",
                        help="the default run's model, batch and shapes (float32, no remat) and "
                             "its useful-FLOPs fraction")
    parser.add_argument("--json", default="bench_train.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.batch, args.seq, args.steps, args.windows = "tiny", 2, 64, 3, 1
        args.dtype = "float32"
    keys = ["preset", "device", "batch", "seq", "dtype", "step_s", "tokens_per_s",
            "model_flops_per_token", "mfu"]
    if args.cpu_default:
        default = load_config([resolve_config_path(p) for p in DEFAULT_CONFIGS], args.overrides)
        args.preset, args.dtype, args.remat = DEFAULT_CONFIGS, "float32", "none"
        args.batch, args.seq = default.data.global_batch, default.data.seq_len
    result = measure(args.preset, args.batch, args.seq, args.steps, args.windows, args.dtype,
                     args.remat, args.overrides)
    if args.cpu_default:
        from lcjax.train.cost import train_step_cost
        rng = np.random.default_rng(0)
        result.update(train_step_cost(default, synthetic_batch(rng, args.batch, args.seq,
                                                               default.model.vocab_size)))
        keys += ["zero_share", "executed_flops_per_token", "useful_flops_per_token",
                 "useful_fraction"]
    for key in keys:
        value = result[key]
        text = f"{value:,.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<24}{text}")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
