"""LoRA vs full fine-tuning: compiled peak memory of one train step, and step time.

    python scripts/bench_lora.py                         # memory on `small`, time on `tiny` (CPU)
    python scripts/bench_lora.py --memory-model small --batch 2 --seq-len 512 --rank 16

Memory: `jax.jit(train_step).lower(abstract state, abstract batch).compile().memory_analysis()`
of the real train step (no arrays allocated, no step run): arguments (params + optimizer state +
adapters + batch), outputs, temporaries, and their sum less the donated (aliased) bytes, for
full fine-tuning and for LoRA (frozen base: no gradients or Adam moments for it). Time: the
jitted step on the tiny model with synthetic batches, median over timed windows after warm-up.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.config import LoraConfig
from lcjax.config_io import load_config, resolve_config_path
from lcjax.parallel import make_mesh
from lcjax.train.state import abstract_state, create_optimizer, init_state
from lcjax.train.step import train_step


def _config(model: str, batch: int, seq: int, lora: LoraConfig):
    cfg = load_config(resolve_config_path(model), [f"data.seq_len={seq}", f"data.global_batch={batch}",
                                                   "train.steps=100"])
    return dataclasses.replace(cfg, lora=lora)


def _batch_shapes(batch: int, seq: int) -> dict:
    i32 = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    return {"inputs": i32, "targets": i32, "segment_ids": i32, "positions": i32,
            "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def memory(model: str, batch: int, seq: int, lora: LoraConfig) -> dict:
    cfg = _config(model, batch, seq, lora)
    tx = create_optimizer(cfg)
    abstract, _ = abstract_state(cfg, tx)
    step = jax.jit(functools.partial(train_step, config=cfg, tx=tx), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(abstract, _batch_shapes(batch, seq)).compile()
    m = compiled.memory_analysis()
    args, out, temp, alias = (int(getattr(m, f"{k}_size_in_bytes")) for k in
                              ("argument", "output", "temp", "alias"))
    return {"mode": "lora" if lora.enabled else "full", "model": model, "batch": batch, "seq_len": seq,
            "params_bytes": _nbytes(abstract.params), "trained_bytes": _nbytes(
                abstract.lora if lora.enabled else abstract.params),
            "opt_state_bytes": _nbytes(abstract.opt_state), "argument_bytes": args,
            "output_bytes": out, "temp_bytes": temp, "alias_bytes": alias,
            "peak_bytes": args + out + temp - alias, "compile_s": time.perf_counter() - t0}


def step_time(model: str, batch: int, seq: int, lora: LoraConfig, steps: int) -> dict:
    cfg = _config(model, batch, seq, lora)
    tx = create_optimizer(cfg)
    state = init_state(cfg, tx, make_mesh(cfg.mesh))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.model.vocab_size, size=(batch, seq + 1), dtype=np.int32)
    data = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((batch, seq), np.float32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}
    data = jax.device_put(data)
    step = jax.jit(functools.partial(train_step, config=cfg, tx=tx), donate_argnums=0)
    for _ in range(3):  # compile + warm-up
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {"mode": "lora" if lora.enabled else "full", "model": model, "batch": batch,
            "seq_len": seq, "step_ms_median": 1e3 * float(np.median(times)),
            "step_ms_min": 1e3 * float(np.min(times)), "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--memory-model", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--time-model", default="tiny")
    p.add_argument("--time-batch", type=int, default=4)
    p.add_argument("--time-seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="default")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", default="bench_lora.json")
    args = p.parse_args()
    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=args.targets)
    rows_mem = [] if args.skip_memory else [
        memory(args.memory_model, args.batch, args.seq_len, mode) for mode in (LoraConfig(), lora)]
    rows_time = [step_time(args.time_model, args.time_batch, args.time_seq_len, mode, args.steps)
                 for mode in (LoraConfig(), lora)]
    gib = 2.0 ** 30
    if rows_mem:
        print(f"compiled train step, {args.memory_model}, batch {args.batch} x {args.seq_len}, "
              f"rank {args.rank}, targets {args.targets!r} ({jax.devices()[0].platform})")
        print(f"{'mode':<6}{'params GiB':>12}{'trained GiB':>13}{'opt GiB':>10}{'args GiB':>10}"
              f"{'temp GiB':>10}{'peak GiB':>10}")
        for r in rows_mem:
            print(f"{r['mode']:<6}{r['params_bytes'] / gib:>12.3f}{r['trained_bytes'] / gib:>13.4f}"
                  f"{r['opt_state_bytes'] / gib:>10.4f}{r['argument_bytes'] / gib:>10.3f}"
                  f"{r['temp_bytes'] / gib:>10.3f}{r['peak_bytes'] / gib:>10.3f}")
    print(f"step time, {args.time_model}, batch {args.time_batch} x {args.time_seq_len}")
    for r in rows_time:
        print(f"{r['mode']:<6}{r['step_ms_median']:>10.2f} ms median  {r['step_ms_min']:>8.2f} ms min")
    with open(args.json, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "host": platform.node(),
                   "memory": rows_mem, "time": rows_time, "rank": args.rank,
                   "targets": args.targets}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
