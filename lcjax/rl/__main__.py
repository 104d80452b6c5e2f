"""`python -m lcjax.rl [--config FILE ...] [key=value ...]`: GRPO with DORA-style async rollouts.

With no arguments: configs/rl/arithmetic_tiny.yaml, the default trained model
(runs/stdlib_tiny; `python -m lcjax.train` writes it) on single-digit arithmetic, printing the
reward per learner step; metrics.jsonl and reward.png go to rl.run_dir. Resumes from the newest
checkpoint in rl.run_dir. `rl.mode=sync` runs the same loop synchronously. SIGINT / SIGTERM
stop at the next learner step with a checkpoint (a second signal exits at once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lcjax.cli import run_main
from lcjax.config_io import load_dataclass, resolve_config_path

DEFAULT_CONFIGS = ("configs/rl/arithmetic_tiny.yaml",)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lcjax.rl", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=None,
                        help=f"a YAML file; repeat to layer files (default: {DEFAULT_CONFIGS[0]})")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, show the Python stack instead of one line")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. rl.mode=sync")
    args = parser.parse_args(argv)

    def body() -> int:
        from lcjax.rl.config import RLRunConfig
        paths = [resolve_config_path(c) for c in (args.config or DEFAULT_CONFIGS)]
        cfg = load_dataclass(RLRunConfig(), paths, args.overrides)
        from lcjax.rl.policy import load_policy
        policy = load_policy(cfg.policy)  # first: a missing model is the likeliest error
        import dataclasses

        from lcjax.rl.loop import RLRun
        from lcjax.rl.plot import line_plot
        from lcjax.train.checkpoint import check_writable
        from lcjax.train.signals import StopRequest, exit_code
        check_writable(cfg.rl.run_dir)
        with open(os.path.join(cfg.rl.run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        print(f"run directory: {cfg.rl.run_dir}  policy: {cfg.policy.path}  env: {cfg.env.name}  "
              f"mode: {cfg.rl.mode} (staleness {cfg.rl.effective_staleness})", flush=True)
        with StopRequest("lcjax.rl") as stop:
            run = RLRun(cfg, policy, log=lambda s: print(s, flush=True), stop=lambda: stop.requested)
            summary = run.run()
        png = os.path.join(cfg.rl.run_dir, "reward.png")
        line_plot(png, summary.rewards)
        hist = " ".join(f"{k}:{v}" for k, v in sorted(summary.staleness_hist.items()))
        first, last = _ends(summary.rewards)
        print(f"{summary.steps} steps, {summary.samples} samples in {summary.wall_s:.0f}s; reward "
              f"{first:.3f} (first 5 steps) -> {last:.3f} (last 5); staleness histogram {hist}; "
              f"plot {png}")
        return exit_code(stop.signum) if stop.requested else 0

    return run_main("lcjax.rl", body, args.traceback)


def _ends(rewards):
    import numpy as np
    r = np.asarray(rewards, np.float64)
    head, tail = r[:5], r[-5:]
    mean = lambda x: float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")
    return mean(head), mean(tail)


if __name__ == "__main__":
    sys.exit(main())
