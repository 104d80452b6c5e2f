"""How much a training learner slows the rollout's decode steps on a shared CPU: alone, with the
learner in a thread of the same process (what `python -m lcjax.rl` does), and with the learner
in a process of its own.

    python scripts/bench_rl_contention.py [--steps 400] [--json out.json]

Rollout: the serve engine on a random `tiny` model decoding 32 sequences for --steps steps.
Learner: the GRPO update on 64 packed random trajectories (30-300 tokens), looping for the
whole rollout. Each mode runs in a fresh process; the table gives ms per decode step and the
learner's steps per second beside it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import threading
import time

import numpy as np


def learner_loop(ready, stop, out) -> None:
    """Train until `stop` is set; put the learner's steps per second on `out`."""
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.rl.config import LearnerConfig
    from lcjax.rl.learner import Learner, build_batch
    from lcjax.rl.objective import ObjectiveConfig
    from lcjax.serve.loading import random_model

    cfg, variables, _ = random_model(load_config(resolve_config_path("tiny")))
    learner = Learner(cfg.model, variables, LearnerConfig(), ObjectiveConfig(), 256)
    rng = np.random.default_rng(0)
    rows = [{"tokens": rng.integers(3, 500, n).tolist(), "gen_mask": [False] * 20 + [True] * (n - 20),
             "logprobs": [0.0] * n, "advantage": 1.0} for n in rng.integers(30, 300, 64)]
    batch = build_batch(rows, 64, 320)
    state, _ = learner.train(learner.state, batch)  # compile
    ready.set()
    steps, start = 0, time.time()
    while not stop.is_set():
        state, _ = learner.train(state, batch)
        steps += 1
    out.put(steps / (time.time() - start))


def one_mode(mode: str, steps: int) -> dict:
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.loading import random_model
    from lcjax.serve.sampling import SamplingParams

    cfg, variables, tok = random_model(load_config(resolve_config_path("tiny")))
    engine = Engine(cfg, variables, tok, EngineConfig(max_num_seqs=32, max_model_len=steps + 64))
    params = SamplingParams(max_tokens=steps, min_tokens=steps, ignore_eos=True)
    engine.generate([[5, 6, 7]] * 32, params)  # compile
    ctx = mp.get_context("spawn")
    rate, worker = ctx.Queue(), None
    if mode == "thread":
        ready, stop = threading.Event(), threading.Event()
        worker = threading.Thread(target=learner_loop, args=(ready, stop, rate), daemon=True)
    elif mode == "process":
        ready, stop = ctx.Event(), ctx.Event()
        worker = ctx.Process(target=learner_loop, args=(ready, stop, rate), daemon=True)
    if worker is not None:
        worker.start()
        ready.wait()
    t = time.perf_counter()
    engine.generate([[5, 6, 7]] * 32, params)
    ms = (time.perf_counter() - t) / steps * 1e3
    learner_rate = None
    if worker is not None:
        stop.set()
        learner_rate = rate.get()
        worker.join()
    return {"mode": mode, "decode_ms_per_step": ms, "learner_steps_per_s": learner_rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--json", default="")
    p.add_argument("--mode", choices=("alone", "thread", "process"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:  # a child: one mode, its row as JSON on the last line
        print(json.dumps(one_mode(args.mode, args.steps)), flush=True)
        return
    rows = []
    for mode in ("alone", "thread", "process"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'learner':8} {'decode ms/step':>15} {'x alone':>8} {'learner steps/s':>16}")
    for r in rows:
        rate = r["learner_steps_per_s"]
        print(f"{r['mode']:8} {r['decode_ms_per_step']:15.1f} "
              f"{r['decode_ms_per_step'] / rows[0]['decode_ms_per_step']:8.2f} "
              f"{'-' if rate is None else f'{rate:.2f}':>16}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "steps": args.steps}, f, indent=1)


if __name__ == "__main__":
    main()
