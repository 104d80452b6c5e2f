"""Fault drill: interrupt tiny training runs at random and chosen moments, resume, check everything.

    python scripts/fault_drill.py                         # 24 interrupts, table + JSON
    python scripts/fault_drill.py --interrupts 4 --steps 6   # a quick look (CI smoke)
    python scripts/fault_drill.py --write-benchmarks      # + a section in scripts/BENCHMARKS.md

Each trial trains the tiny model (`python -m lcjax.train`, a generated text corpus, async
checkpoints every 2 steps) in a fresh run directory and interrupts it with SIGKILL, SIGTERM,
SIGINT or two quick SIGTERMs, at a random time or at a chosen point: during start-up, at the
"run directory" line (set-up), during the first compile, after a step line, or right after the
step line of a checkpoint step (mid-save). Then it resumes, sometimes interrupting again, and
finally runs to the end. It counts:
  - interrupts survived: the process ended (SIGTERM/SIGINT with 143/130) and the next run resumed
    from a checkpoint (or from scratch when none existed yet);
  - resumes exact: the trial's per-step train losses in metrics.jsonl, each step logged once,
    `==` an uninterrupted run's;
  - non-finite checkpoints: every checkpoint left after each interrupt is loaded and checked,
    plus a diverging run (learning_rate 1e30, no clipping) that must stop without saving NaNs;
  - orphan processes: descendants of a killed trainer (grain workers with data.num_workers=2 in
    half the trials) still alive 10 s after it ended.
A persistent XLA compilation cache is shared by all runs, so each restart costs seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega def return class import yield").split()
KINDS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGTERMx2")
POINTS = ("startup", "setup", "compile", "step", "save", "random")


def write_corpus(root: pathlib.Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(60):
        words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(40 + i % 17)]
        (root / f"doc{i:03d}.txt").write_text(" ".join(words) + "\n")
    return str(root / "*.txt")


def train_args(corpus: str, run_dir: pathlib.Path, steps: int, workers: int, *extra: str) -> list:
    return [sys.executable, "-m", "lcjax.train", "--no-samples", "--config", "tiny", "data.source=text",
            f"data.path={corpus}", "data.seq_len=32", "data.global_batch=4",
            "data.heldout_fraction=0.1", f"data.num_workers={workers}", "model.vocab_size=320",
            "model.num_layers=1", "model.loza.layer_pattern=01", f"train.run_dir={run_dir}",
            f"train.steps={steps}", "train.checkpoint_every=2", "train.eval_every=0",
            "train.eval_batches=1", "train.log_every=1", "train.keep_checkpoints=3",
            "optimizer.warmup_steps=2", *extra]


def descendants(pid: int) -> set:
    """Live (non-zombie) processes below `pid`, from /proc."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pids: set) -> set:
    left = set()
    for pid in pids:
        try:
            state = open(f"/proc/{pid}/stat").read()
            if state[state.rindex(")") + 2] != "Z":
                left.add(pid)
        except OSError:
            pass
    return left


class Run:
    """One `python -m lcjax.train` child whose stdout lines are collected by a thread."""

    def __init__(self, args: list, env: dict):
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list = []
        self.tree: set = set()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            self.tree |= descendants(self.proc.pid)

    def wait_line(self, predicate, timeout: float) -> bool:
        end = time.time() + timeout
        seen = 0
        while time.time() < end and self.proc.poll() is None:
            while seen < len(self.lines):
                if predicate(self.lines[seen]):
                    return True
                seen += 1
            time.sleep(0.005)
        return False


def step_of(line: str):
    parts = line.split()
    return int(parts[1]) if len(parts) > 2 and parts[0] == "step" and parts[1].isdigit() else None


def interrupt(run: Run, kind: str, point: str, steps: int, rng: random.Random) -> str:
    """Wait for `point`, send `kind`; returns where it landed."""
    if point == "startup":
        time.sleep(rng.uniform(0.2, 2.0))
    elif point == "setup":
        run.wait_line(lambda ln: ln.startswith("run directory"), 120)
        time.sleep(rng.uniform(0.0, 1.0))
    elif point == "compile":
        run.wait_line(lambda ln: ln.startswith("run directory"), 120)
        time.sleep(rng.uniform(1.0, 4.0))
    elif point in ("step", "save"):
        target = rng.randrange(2, steps, 2) if point == "save" else rng.randrange(1, steps)
        run.wait_line(lambda ln: (step_of(ln) or 0) >= target, 180)
        time.sleep(rng.uniform(0.0, 0.03))
    else:
        time.sleep(rng.uniform(0.5, 15.0))
    landed = next((ln for ln in reversed(run.lines) if step_of(ln)), "before step 1")
    run.tree |= descendants(run.proc.pid)
    pid = run.proc.pid
    if run.proc.poll() is not None:
        return f"{landed} (already finished)"
    if kind == "SIGKILL":
        os.kill(pid, signal.SIGKILL)
    elif kind == "SIGTERMx2":
        os.kill(pid, signal.SIGTERM)
        time.sleep(rng.uniform(0.0, 0.3))
        if run.proc.poll() is None:
            os.kill(pid, signal.SIGTERM)
    else:
        os.kill(pid, getattr(signal, kind))
    return landed


def expected_codes(kind: str) -> set:
    """Codes a correct trainer may end with: 128+signum from its handlers, 0 if it had just
    finished, -signum if the signal came before Python had installed any handler."""
    return {"SIGKILL": {-9}, "SIGTERM": {143, -15, 0}, "SIGINT": {130, -2, 0},
            "SIGTERMx2": {143, -15, 0}}[kind]


def train_losses(run_dir: pathlib.Path) -> list:
    rows = [json.loads(ln) for ln in open(run_dir / "metrics.jsonl")]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def checkpoints_finite(run_dir: pathlib.Path) -> tuple:
    """(checked, non-finite) over every complete checkpoint in the run."""
    import warnings

    import numpy as np
    import orbax.checkpoint as ocp
    warnings.filterwarnings("ignore", message="Sharding info not provided")
    root = run_dir / "checkpoints"
    if not root.exists():
        return 0, 0
    manager = ocp.CheckpointManager(str(root), item_names=("state", "data"))
    checked = bad = 0
    for step in manager.all_steps():
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
        leaves = [np.asarray(x) for x in _leaves(state["state"])]
        checked += 1
        bad += int(not all(np.all(np.isfinite(x)) for x in leaves if x.dtype.kind == "f"))
    manager.close()
    return checked, bad


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    elif tree is not None:
        yield tree


def drill(interrupts: int, steps: int, seed: int, work: pathlib.Path, log=print) -> dict:
    rng = random.Random(seed)
    corpus = write_corpus(work / "corpus")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "LCJAX_TYPECHECK": "0",
           "JAX_COMPILATION_CACHE_DIR": str(work / "xla-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    ref_dir = work / "reference"
    ref = subprocess.run(train_args(corpus, ref_dir, steps, 0), cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if ref.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{ref.stdout[-3000:]}{ref.stderr[-3000:]}")
    reference = train_losses(ref_dir)
    log(f"reference: {steps} steps in {time.time() - t0:.0f} s")

    stats = {"interrupts": 0, "survived": 0, "trials": 0, "resumes_exact": 0,
             "checkpoints_checked": 0, "non_finite_checkpoints": 0, "orphans": 0,
             "unexpected_exit_codes": 0, "events": []}
    plan = [(KINDS[i % len(KINDS)], POINTS[i % len(POINTS)]) for i in range(interrupts)]
    rng.shuffle(plan)
    trial = 0
    while plan:
        trial += 1
        run_dir = work / f"trial{trial:02d}"
        workers = 2 if trial % 2 else 0
        for _ in range(min(len(plan), rng.choice((1, 2)))):
            kind, point = plan.pop()
            run = Run(train_args(corpus, run_dir, steps, workers), env)
            landed = interrupt(run, kind, point, steps, rng)
            try:
                code = run.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                run.proc.kill()
                code = "hung"
            tree = run.tree
            time.sleep(0.2)
            deadline = time.time() + 10
            while alive(tree) and time.time() < deadline:
                time.sleep(0.2)
            orphans = alive(tree)
            for pid in orphans:
                os.kill(pid, signal.SIGKILL)
            checked, bad = checkpoints_finite(run_dir)
            ok_code = code in expected_codes(kind)
            stats["interrupts"] += 1
            stats["orphans"] += len(orphans)
            stats["checkpoints_checked"] += checked
            stats["non_finite_checkpoints"] += bad
            stats["unexpected_exit_codes"] += int(not ok_code)
            event = dict(trial=trial, kind=kind, point=point, landed=landed, exit=code,
                         orphans=len(orphans), workers=workers)
            stats["events"].append(event)
            log(f"trial {trial:2d} {kind:<9} at {point:<7} ({landed}) -> exit {code}"
                f"{'' if ok_code else ' UNEXPECTED'}, orphans {len(orphans)}")
        final = subprocess.run(train_args(corpus, run_dir, steps, workers), cwd=ROOT, env=env,
                               capture_output=True, text=True)
        resumed = final.returncode == 0
        stats["survived"] += sum(1 for e in stats["events"] if e["trial"] == trial) if resumed else 0
        losses = train_losses(run_dir) if resumed else []
        exact = losses == reference
        stats["trials"] += 1
        stats["resumes_exact"] += int(exact)
        checked, bad = checkpoints_finite(run_dir)
        stats["checkpoints_checked"] += checked
        stats["non_finite_checkpoints"] += bad
        if not exact:
            log(f"trial {trial}: NOT exact (exit {final.returncode}): {final.stderr[-800:]}")

    diverge_dir = work / "diverge"
    out = subprocess.run(train_args(corpus, diverge_dir, steps, 0, "optimizer.learning_rate=1e30",
                                    "optimizer.grad_clip=0", "optimizer.warmup_steps=0",
                                    "train.checkpoint_every=1"),
                         cwd=ROOT, env=env, capture_output=True, text=True)
    checked, bad = checkpoints_finite(diverge_dir)
    stats["diverging_run_exit"] = out.returncode
    stats["diverging_run_message"] = (out.stderr.strip().splitlines() or [""])[-1]
    stats["checkpoints_checked"] += checked
    stats["non_finite_checkpoints"] += bad
    stats["seconds"] = round(time.time() - t0, 1)
    return stats


def table(stats: dict) -> list:
    n = stats["interrupts"]
    return [
        ("interrupts survived", f"{stats['survived']} / {n}", "all"),
        ("resumes exact (losses ==, each step logged once)",
         f"{stats['resumes_exact']} / {stats['trials']} trials", "all"),
        ("exit codes as expected (143 / 130 / killed)", f"{n - stats['unexpected_exit_codes']} / {n}",
         "all"),
        ("checkpoints ever saved non-finite",
         f"{stats['non_finite_checkpoints']} of {stats['checkpoints_checked']} checked", "0"),
        ("orphan processes", str(stats["orphans"]), "0"),
        ("diverging run", f"exit {stats['diverging_run_exit']}: {stats['diverging_run_message'][:70]}",
         "exit 2, no NaN saved"),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interrupts", type=int, default=24)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fault_drill.json")
    p.add_argument("--write-benchmarks", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 4:
        p.error(f"--steps={args.steps}: need at least 4 (checkpoints every 2 steps)")
    with tempfile.TemporaryDirectory(prefix="lcjax-fault-drill-") as tmp:
        stats = drill(args.interrupts, args.steps, args.seed, pathlib.Path(tmp))
    rows = table(stats)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  {'result':<40}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<40}  {target}")
    pathlib.Path(args.out).write_text(json.dumps(stats, indent=1))
    passed = (stats["survived"] == stats["interrupts"] and stats["resumes_exact"] == stats["trials"]
              and stats["non_finite_checkpoints"] == 0 and stats["orphans"] == 0
              and stats["unexpected_exit_codes"] == 0 and stats["diverging_run_exit"] == 2)
    if args.write_benchmarks:
        lines = [f"\n## Fault drill, tiny model on CPU ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
                 f"`python scripts/fault_drill.py --interrupts {args.interrupts} --steps {args.steps} "
                 f"--seed {args.seed} --write-benchmarks` ({stats['seconds']:.0f} s, 2 shared cores)", "",
                 "| measure | result | target |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        with open(ROOT / "scripts" / "BENCHMARKS.md", "a") as f:
            f.write("\n".join(lines) + "\n")
    print(f"\n{'PASS' if passed else 'FAIL'}; JSON: {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
