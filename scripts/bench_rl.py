"""RL throughput: rollout and learner tokens/s, and async (DORA) vs sync wall time for the
same number of learner steps under a long-tailed generation-length workload.

The workload is the machinery's, not learning: a randomly initialised model (`--model`), the
arithmetic environment with the group filter off (every group is trained), and each
trajectory decoding exactly L tokens (EOS ignored), L = min(max_tokens, 2 + floor(scale *
Pareto(alpha))), so most are short and a few run to the cap. Both modes run in one process
after one warm-up run each (every jitted shape compiled), same seeds, then in `--rounds`
interleaved rounds (sync, async, sync, async, ...), so a change in machine load hits both;
the speed-up is reported per round (median, min, max). With `--placement thread,process` each
round runs async once per learner placement after the same sync run (`auto`, the default, is
what `python -m lcjax.rl` picks: a process on its own cores on a CPU backend). The first and last
steps of a run fill and drain the pipeline (async rolls out groups it never trains), which a
real run of hundreds of steps amortises: 24 steps keep that share near a tenth.

    python scripts/bench_rl.py [--model tiny] [--placement auto|thread|process|thread,process] [--rounds 3] [--steps 24] [--max-tokens 256] [--alpha 1.0] [--scale 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np

from lcjax.config_io import load_config, resolve_config_path
from lcjax.rl.config import LearnerConfig, LoopConfig, RLRunConfig, RolloutConfig
from lcjax.rl.loop import RLRun
from lcjax.rl.objective import ObjectiveConfig
from lcjax.serve.loading import random_model
from lcjax.serve.sampling import SamplingParams


def long_tailed(run: RLRun, alpha: float, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cap = run.cfg.rollout.max_tokens

    def params() -> SamplingParams:
        n = int(min(cap, 2 + np.floor(scale * rng.pareto(alpha))))
        return SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, logprobs=0,
                              seed=int(rng.integers(0, 2**31)))

    run.rollout.sampling_params = params


def one_run(policy, mode: str, steps: int, args, placement: str = "thread") -> dict:
    cfg = RLRunConfig(
        rl=LoopConfig(mode=mode, staleness=args.staleness, steps=steps, groups_per_step=args.groups,
                      seed=0),
        rollout=RolloutConfig(group_size=args.group_size, max_tokens=args.max_tokens,
                              max_num_seqs=args.slots, max_model_len=args.max_tokens + 64),
        objective=ObjectiveConfig(filter_equal_groups=False),
        learner=LearnerConfig(placement=placement))
    run = RLRun(cfg, policy, log=lambda s: None, write_files=False)
    run.warmup()  # every packed-batch shape (compiled once per process)
    long_tailed(run, args.alpha, args.scale, seed=1)
    s = run.run()
    return {"mode": mode, "learner": run.placement, "steps": s.steps, "samples": s.samples, "wall_s": s.wall_s,
            "rollout_tokens": s.rollout_tokens, "learner_tokens": s.learner_tokens,
            "learner_s": s.learner_s, "rollout_tok_s": s.rollout_tokens / s.wall_s,
            "learner_tok_s": s.learner_tokens / max(s.learner_s, 1e-9),
            "staleness_hist": {str(k): v for k, v in sorted(s.staleness_hist.items())}}


def share_compiles() -> None:
    """A persistent compilation cache for this process and the learner processes it spawns
    (each async run's child would otherwise compile every batch shape again), unless one is
    configured already."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-rl-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def speedup(sync: dict, asyn: dict) -> float:
    """Time per trained sample, sync / async."""
    return (sync["wall_s"] / sync["samples"]) / (asyn["wall_s"] / asyn["samples"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="preset (random weights): tiny | small")
    p.add_argument("--rounds", type=int, default=3, help="interleaved sync/async pairs")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--staleness", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--scale", type=float, default=8.0)
    p.add_argument("--placement", default="auto",
                   help="where async mode's learner runs (learner.placement: auto | thread | process); "
                        "a comma list runs async once per placement in each round: thread,process")
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds={args.rounds}: expected >= 1")
    placements = [p.strip() for p in args.placement.split(",")]
    for placement in placements:
        if placement not in ("auto", "thread", "process"):
            raise SystemExit(f"--placement={args.placement}: {placement!r} is not auto, thread or process")
    share_compiles()
    policy = random_model(load_config(resolve_config_path(args.model)))
    t0 = time.perf_counter()
    one_run(policy, "sync", 3, args)  # warm-up: compile every shape both modes use
    for placement in placements:
        one_run(policy, "async", 3, args, placement)
    warm = time.perf_counter() - t0
    rows, ratios = [], {p: [] for p in placements}
    for r in range(args.rounds):
        sync = dict(one_run(policy, "sync", args.steps, args), round=r)
        rows.append(sync)
        for placement in placements:
            asyn = dict(one_run(policy, "async", args.steps, args, placement), round=r)
            rows.append(asyn)
            ratios[placement].append(speedup(sync, asyn))
    print(f"warm-up (compiles) {warm:.0f}s; {args.rounds} rounds of {args.steps} learner steps of "
          f"{args.groups} groups x {args.group_size}; lengths min({args.max_tokens}, 2 + "
          f"{args.scale} * Pareto({args.alpha}))")
    print(f"{'round':5} {'mode':6} {'learner':7} {'samples':>7} {'wall s':>7} {'s/sample':>9} {'rollout tok/s':>14} "
          f"{'learner tok/s':>14}  staleness")
    for r in rows:
        print(f"{r['round']:5d} {r['mode']:6} {r['learner']:7} {r['samples']:7d} {r['wall_s']:7.1f} "
              f"{r['wall_s'] / r['samples']:9.3f} {r['rollout_tok_s']:14.0f} "
              f"{r['learner_tok_s']:14.0f}  {r['staleness_hist']}")
    summary = {}
    for placement, values in ratios.items():
        summary[placement] = {"median": float(np.median(values)), "min": min(values),
                              "max": max(values), "rounds": values}
    for placement, s in summary.items():
        print(f"async ({placement}) / sync speed-up (time per trained sample): median "
              f"{s['median']:.2f}x (min {s['min']:.2f}x, max {s['max']:.2f}x; per round "
              f"{' '.join(f'{x:.2f}' for x in s['rounds'])})")
    print(f"load average {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "device": jax.devices()[0].device_kind,
                       "speedup": summary[placements[0]], "speedup_by_placement": summary,
                       "args": vars(args), "warmup_s": warm,
                       "loadavg": os.getloadavg(),
                       "machine": platform.processor() or platform.machine()}, f, indent=1)


if __name__ == "__main__":
    main()
