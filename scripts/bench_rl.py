"""RL throughput: rollout and learner tokens/s, and async (DORA) vs sync wall time for the
same number of learner steps under a long-tailed generation-length workload.

The workload is the machinery's, not learning: a randomly initialised model (`--model`), the
arithmetic environment with the group filter off (every group is trained), and each
trajectory decoding exactly L tokens (EOS ignored), L = min(max_tokens, 2 + floor(scale *
Pareto(alpha))), so most are short and a few run to the cap. Both modes run in one process
after one warm-up run each (every jitted shape compiled), same seeds, then in `--rounds`
interleaved rounds (sync, async, sync, async, ...), so a change in machine load hits both;
the speed-up is reported per round (median, min, max).

    python scripts/bench_rl.py [--model tiny] [--placement auto|thread|process] [--rounds 3] [--steps 8] [--max-tokens 256] [--alpha 1.0] [--scale 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
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


def one_run(policy, mode: str, steps: int, args) -> dict:
    cfg = RLRunConfig(
        rl=LoopConfig(mode=mode, staleness=args.staleness, steps=steps, groups_per_step=args.groups,
                      seed=0),
        rollout=RolloutConfig(group_size=args.group_size, max_tokens=args.max_tokens,
                              max_num_seqs=args.slots, max_model_len=args.max_tokens + 64),
        objective=ObjectiveConfig(filter_equal_groups=False),
        learner=LearnerConfig(placement=args.placement))
    run = RLRun(cfg, policy, log=lambda s: None, write_files=False)
    run.warmup()  # every packed-batch shape (compiled once per process)
    long_tailed(run, args.alpha, args.scale, seed=1)
    s = run.run()
    return {"mode": mode, "learner": run.placement, "steps": s.steps, "samples": s.samples, "wall_s": s.wall_s,
            "rollout_tokens": s.rollout_tokens, "learner_tokens": s.learner_tokens,
            "learner_s": s.learner_s, "rollout_tok_s": s.rollout_tokens / s.wall_s,
            "learner_tok_s": s.learner_tokens / max(s.learner_s, 1e-9),
            "staleness_hist": {str(k): v for k, v in sorted(s.staleness_hist.items())}}


def speedup(sync: dict, asyn: dict) -> float:
    """Time per trained sample, sync / async."""
    return (sync["wall_s"] / sync["samples"]) / (asyn["wall_s"] / asyn["samples"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="preset (random weights): tiny | small")
    p.add_argument("--rounds", type=int, default=3, help="interleaved sync/async pairs")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--staleness", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--scale", type=float, default=8.0)
    p.add_argument("--placement", default="auto", choices=("auto", "thread", "process"),
                   help="where async mode's learner runs (learner.placement; auto: a process on CPU)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds={args.rounds}: expected >= 1")
    policy = random_model(load_config(resolve_config_path(args.model)))
    t0 = time.perf_counter()
    for mode in ("sync", "async"):  # warm-up: compile every shape both modes use
        one_run(policy, mode, 3, args)
    warm = time.perf_counter() - t0
    rows, ratios = [], []
    for r in range(args.rounds):
        pair = [dict(one_run(policy, mode, args.steps, args), round=r) for mode in ("sync", "async")]
        rows += pair
        ratios.append(speedup(*pair))
    print(f"warm-up (compiles) {warm:.0f}s; {args.rounds} rounds of {args.steps} learner steps of "
          f"{args.groups} groups x {args.group_size}; lengths min({args.max_tokens}, 2 + "
          f"{args.scale} * Pareto({args.alpha}))")
    print(f"{'round':5} {'mode':6} {'learner':7} {'samples':>7} {'wall s':>7} {'s/sample':>9} {'rollout tok/s':>14} "
          f"{'learner tok/s':>14}  staleness")
    for r in rows:
        print(f"{r['round']:5d} {r['mode']:6} {r['learner']:7} {r['samples']:7d} {r['wall_s']:7.1f} "
              f"{r['wall_s'] / r['samples']:9.3f} {r['rollout_tok_s']:14.0f} "
              f"{r['learner_tok_s']:14.0f}  {r['staleness_hist']}")
    summary = {"median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios),
               "rounds": ratios}
    print(f"async / sync speed-up (time per trained sample): median {summary['median']:.2f}x "
          f"(min {summary['min']:.2f}x, max {summary['max']:.2f}x; per round "
          f"{' '.join(f'{x:.2f}' for x in ratios)}); load average {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "device": jax.devices()[0].device_kind, "speedup": summary, "args": vars(args), "warmup_s": warm,
                       "loadavg": os.getloadavg(),
                       "machine": platform.processor() or platform.machine()}, f, indent=1)


if __name__ == "__main__":
    main()
