"""Every on-device check and benchmark in one timed run: kernels vs references, the model, speed.

    python scripts/device_check.py --budget 480 --out device_check.json   # one H100/H200 or TPU
    python scripts/device_check.py --smoke --out /tmp/device_check.json   # CPU, tiny, interpret

Sections, in order (each time-boxed; when the budget runs low the rest become 'skipped
(budget)' rows):
1. kernels: every registered backend of block-sparse attention (fwd+bwd, dense causal and LoZA),
   paged decode attention (absorbed MLA, causal and LoZA), grouped matmul (fwd+bwd) and every
   quant_matmul / quant_gmm mode and sparse GEMV (+ its speed vs the dense GEMV at s=0.5),
   against references computed in float32/float64 from the same
   inputs (interpret-mode variants only on CPU: on a device the compiled kernel is checked);
2. model: the `small` forward with default implementations against attention_impl="xla";
3. benchmarks (pipelined timing, pallas_kernels/timing.py; functions of scripts/bench_*.py):
   A²ATS decode step and device KV bytes vs exact at 32k and N-gram tables on host
   (bench_sparsity.py), sparse vs dense MTP verify at 32k (bench_sparse_verify.py timing), async
   vs sync RL (bench_rl.py), each script in a subprocess (device_check_scripts.py);
   dense causal attention vs cuDNN at 8k-32k, LoZA time vs 1.25 x density x dense time, GMM
   TFLOP/s at T16k E64 2048->1024, `small` training MFU, `small` decode vs transformers at batch
   1 and 16 and the HBM roofline fraction at batch 1.
A backend that declines a case (NotImplementedError), or one this platform does not run, gives
an 'unavailable: reason' row instead of failing the run. Prints one table (check, measured,
target, pass) and writes one JSON; exit status 1 when a check fails or errors. With --smoke
the same code runs on CPU with tiny shapes (interpret-mode kernels); targets then mean nothing
and are not judged.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the budget counts imports and device start-up too

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
if "--smoke" in sys.argv:  # triton's interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench_* scripts
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

import device_check_bench as bench  # noqa: E402
import device_check_kernels as kernels  # noqa: E402
import device_check_scripts as scripts  # noqa: E402

# name -> (share of the budget, item generator, which settings). A section's time box is its
# share of what is left, spread over the sections still to run, so time saved early is spent later.
SECTIONS = (
    ("attention kernels", 0.07, kernels.attention_items, "shapes"),
    ("decode kernels", 0.03, kernels.decode_items, "shapes"),
    ("gmm kernels", 0.03, kernels.gmm_items, "shapes"),
    ("quant kernels", 0.05, kernels.quant_items, "shapes"),
    ("sparse gemv kernels", 0.04, kernels.sparse_gemv_items, "shapes"),
    ("model", 0.05, bench.model_items, "settings"),
    ("sparsity bench", 0.10, scripts.sparsity_items, "scripts"),
    ("sparse verify bench", 0.14, scripts.verify_items, "scripts"),
    ("rl bench", 0.18, scripts.rl_items, "scripts"),
    ("attention bench", 0.08, bench.attention_items, "settings"),
    ("gmm bench", 0.03, bench.gmm_items, "settings"),
    ("train bench", 0.08, bench.train_items, "settings"),
    ("decode bench", 0.12, bench.decode_items, "settings"),
)


class Budget:
    """Wall-clock budget of the whole run, and a deadline per section."""

    def __init__(self, seconds: float, start: float | None = None):
        self.seconds = seconds
        self.start = time.perf_counter() if start is None else start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def run_item(section: str, check: str, backend: str, thunk, estimate: float, deadline: float,
             budget: Budget) -> dict:
    """One row: the thunk's verdict, 'unavailable: ...', 'error: ...' or 'skipped (budget)'."""
    row = dict(section=section, check=check, backend=backend, measured="", value=None, target="",
               passed=None, status="ok", seconds=0.0)
    if min(deadline - budget.elapsed(), budget.left()) < estimate:
        row["status"] = "skipped (budget)"
        return row
    start = time.perf_counter()
    try:
        row.update(thunk())
    except (NotImplementedError, ImportError) as e:  # declined, or an optional package missing
        row["status"] = f"unavailable: {_one_line(e)}"
    except Exception as e:  # noqa: BLE001 - one table per run: report and go on
        if "NotImplementedError" in str(e):  # declined inside a callback (interpreted kernels)
            row["status"] = f"unavailable: {_one_line(e).split('NotImplementedError')[-1][2:]}"
        elif backend in ("model", "train", "decode", scripts.BACKEND) or kernels.runnable_here(backend):
            row.update(status=f"error: {_one_line(e)}", passed=False,
                       traceback=traceback.format_exc(limit=6))
        else:  # e.g. a GPU kernel asked to lower on CPU
            row["status"] = f"unavailable: {_one_line(e)}"
    row["seconds"] = time.perf_counter() - start
    if row["status"] == "ok" and row["passed"] is False:
        row["status"] = "fail"
    return row


def _one_line(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:240]


def run(budget: Budget, shapes, settings, only=None, script_settings=None) -> list[dict]:
    rows = []
    scripts.budget_left = budget.left
    chosen = dict(shapes=shapes, settings=settings,
                  scripts=script_settings or scripts.SCRIPT_SETTINGS)
    sections = [s for s in SECTIONS if not only or s[0] in only]
    for i, (name, share, generator, which) in enumerate(sections):
        box = budget.left() * share / sum(s[1] for s in sections[i:])
        deadline = budget.elapsed() + box
        print(f"== {name} (box {box:.0f} s, {budget.left():.0f} s left)", flush=True)
        try:
            items = list(generator(chosen[which]))
        except Exception as e:  # noqa: BLE001 - e.g. an optional import missing
            rows.append(dict(section=name, check=generator.__name__, backend="-", measured="",
                             value=None, target="", passed=False,
                             status=f"error: {_one_line(e)}", seconds=0.0))
            continue
        for check, backend, thunk, estimate in items:
            row = run_item(name, check, backend, thunk, estimate, deadline, budget)
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def verdict(row: dict) -> str:
    if row["status"] not in ("ok", "fail"):
        return row["status"].split(":")[0]
    return {True: "PASS", False: "FAIL", None: "-"}[row["passed"]]


def format_row(row: dict) -> str:
    measured = row["measured"] if row["status"] in ("ok", "fail") else row["status"]
    return f"{row['check'][:78]:<78} | {measured[:90]:<90} | {row['target'][:28]:<28} | " \
           f"{verdict(row)}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpret kernels")
    p.add_argument("--sections", nargs="+", choices=[s[0] for s in SECTIONS], default=None,
                   help="run only these sections")
    p.add_argument("--out", type=Path, default=Path("device_check.json"))
    args = p.parse_args(argv)
    budget = Budget(args.budget, START)
    shapes = kernels.SMOKE_SHAPES if args.smoke else kernels.Shapes()
    settings = bench.SMOKE_SETTINGS if args.smoke else bench.Settings()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"budget {args.budget:.0f} s{', smoke' if args.smoke else ''}", flush=True)
    rows = run(budget, shapes, settings, args.sections,
               scripts.SMOKE_SCRIPT_SETTINGS if args.smoke else scripts.SCRIPT_SETTINGS)
    print(f"\n{'check':<78} | {'measured':<90} | {'target':<28} | pass")
    for row in rows:
        print(format_row(row))
    failed = [r for r in rows if r["passed"] is False]
    counts = {v: sum(verdict(r) == v for r in rows) for v in {verdict(r) for r in rows}}
    print(f"\n{len(rows)} rows in {budget.elapsed():.0f} s: {counts}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        device=device.device_kind, platform=jax.default_backend(), jax=jax.__version__,
        smoke=args.smoke, budget_s=args.budget, elapsed_s=budget.elapsed(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python scripts/device_check.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        counts=counts, rows=rows), indent=1))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
