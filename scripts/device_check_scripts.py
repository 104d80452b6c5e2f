"""Benchmarks for scripts/device_check.py that run as their own scripts, in a subprocess each:
A²ATS decode vs exact (bench_sparsity.py), sparse vs dense MTP verification
(bench_sparse_verify.py timing) and asynchronous vs synchronous RL (bench_rl.py).

A subprocess keeps a script's device memory, compile caches and threads out of the checking
process, and its time limit is enforced by killing it. One script run feeds several rows: the
first row of a section runs it, the others read its JSON. Each `*_items(settings)` yields
(check name, backend, thunk, seconds estimate) like device_check_kernels.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKEND = "script"  # run_item treats an error here as a failure, never as 'unavailable'

# Seconds left in the whole run; device_check.run sets it so a script never outlives the budget.
budget_left = lambda: float("inf")  # noqa: E731


@dataclasses.dataclass(frozen=True)
class ScriptSettings:
    """Arguments of each script: device-sized, or tiny for --smoke on CPU."""

    sparsity: tuple = ("--batch", "16", "--contexts", "4096,32768", "--reps", "5")
    sparsity_context: int = 32768
    # Each (context, setting) compiles the 1B `small` verify pass (~10-20 s on an H100/H200).
    verify: tuple = ("--batch", "8", "--contexts", "32768", "--repeats", "5", "--verify-only",
                     "--settings", "block_budget=64")
    verify_context: int = 32768
    rl: tuple = ("--model", "tiny", "--rounds", "1", "--steps", "4")
    limits: tuple = (100, 170, 240)  # seconds: sparsity, verify, rl


SCRIPT_SETTINGS = ScriptSettings()
SMOKE_SCRIPT_SETTINGS = ScriptSettings(
    sparsity=("--contexts", "1024", "--reps", "1", "--ngram-scale", "4096"), sparsity_context=1024,
    verify=("--model", "tiny", "--contexts", "512", "--repeats", "1", "--verify-only",
            "--settings", "block_budget=8"),
    verify_context=512,
    rl=("--rounds", "1", "--steps", "1", "--groups", "1", "--group-size", "2", "--max-tokens", "16",
        "--slots", "4"),
    limits=(300, 300, 300))


class ScriptRun:
    """One script's JSON, produced on first use by a subprocess with a time limit."""

    def __init__(self, script: str, args: tuple, limit: float):
        self.script, self.args, self.limit = script, args, limit
        self.result, self.error = None, None

    def get(self) -> dict:
        if self.result is None and self.error is None:
            self._run()
        if self.error is not None:
            raise RuntimeError(self.error)
        return self.result

    def _run(self) -> None:
        limit = max(1.0, min(self.limit, budget_left() - 5.0))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.json"
            cmd = [sys.executable, str(HERE / self.script), *self.args, "--json", str(out)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
            except subprocess.TimeoutExpired:
                self.error = f"{self.script} ran past {limit:.0f} s"
                return
            print(proc.stdout[-4000:], flush=True)  # the script's own table, in the log
            if proc.returncode != 0 or not out.exists():
                self.error = f"{self.script} exit {proc.returncode}: {proc.stderr[-600:]}"
                return
            self.result = json.loads(out.read_text())


def _judged(value: float, target: float, on_device: bool, text: str) -> dict:
    return dict(measured=text, value=value, target=f"<= {target}",
                passed=bool(value <= target) if on_device else None)


def _on_device() -> bool:
    import jax
    return jax.default_backend() != "cpu"


# ------------------------------------------------------------------------------ A²ATS
def sparsity_items(st: ScriptSettings):
    """A²ATS decode step and device KV bytes per sequence vs exact, N-gram tables on host."""
    run = ScriptRun("bench_sparsity.py", st.sparsity, st.limits[0])
    ctx = st.sparsity_context

    def row():
        return next(r for r in run.get()["attention"] if r["context"] == ctx)

    def step(key):
        r = row()
        if key not in r:
            raise NotImplementedError("no host memory space on this platform")
        ratio = r[key] / r["exact_ms"]
        return _judged(ratio, 0.5, _on_device(),
                       f"{ratio:.2f}x exact ({r[key]:.2f} vs {r['exact_ms']:.2f} ms, batch {r['batch']})")

    def kv_bytes():
        r = row()
        ratio = r["a2ats_host_device_kv_mib"] / r["exact_kv_mib"]
        return _judged(ratio, 0.15, _on_device(),
                       f"{ratio:.3f}x exact ({r['a2ats_host_device_kv_mib']:.1f} vs "
                       f"{r['exact_kv_mib']:.1f} MiB)")

    def ngram():
        ng = run.get()["ngram"]
        return dict(measured=f"step {ng['offload_ms'] / ng['device_ms']:.2f}x on-device, device "
                             f"{ng['offload_device_mib']:.1f} vs {ng['device_mib']:.1f} MiB, "
                             f"equal {ng['equal_outputs']}",
                    value=ng["offload_ms"] / ng["device_ms"], target="outputs equal",
                    passed=bool(ng["equal_outputs"]))

    capped = ScriptRun("bench_sparsity.py", (*st.sparsity, "--max-gather", "0.1"), st.limits[0])

    def capped_step():
        r = next(r for r in capped.get()["attention"] if r["context"] == ctx)
        ratio = r["a2ats_ms"] / r["exact_ms"]
        return _judged(ratio, 0.5, _on_device(), f"{ratio:.2f}x exact ({r['a2ats_ms']:.2f} vs "
                                                 f"{r['exact_ms']:.2f} ms, batch {r['batch']})")

    yield f"A²ATS decode step, pages on device, ctx {ctx}", BACKEND, lambda: step("a2ats_ms"), 20.0
    yield f"A²ATS decode step, pages in host memory, ctx {ctx}", BACKEND, \
        lambda: step("a2ats_host_ms"), 1.0
    yield f"A²ATS device KV bytes per sequence (host offload), ctx {ctx}", BACKEND, kv_bytes, 1.0
    yield "N-gram tables in host memory vs on device (embedding step)", BACKEND, ngram, 1.0
    yield f"A²ATS decode step, gather capped at 10 %, pages on device, ctx {ctx}", BACKEND, \
        capped_step, 20.0


# ------------------------------------------------------------------------------ sparse verify
def verify_items(st: ScriptSettings):
    """Verify pass and whole MTP round, sparse vs dense, at the longest context."""
    run = ScriptRun("bench_sparse_verify.py", ("timing", *st.verify), st.limits[1])
    settings = st.verify[st.verify.index("--settings") + 1:]
    ctx = st.verify_context

    def ratio(setting, key, target):
        rows = [r for r in run.get()["rows"] if r["context"] == ctx]
        dense = next(r for r in rows if r["setting"] == "dense")
        mine = next(r for r in rows if r["setting"] == setting)
        x = mine[key] / dense[key]
        if x != x:  # NaN: the script skipped this timing (--verify-only)
            raise NotImplementedError(f"{key} not timed (--verify-only)")
        text = f"{x:.2f}x dense ({mine[key]:.2f} vs {dense[key]:.2f} ms)"
        if target is None:
            return dict(measured=text, value=x, target="", passed=None)
        return _judged(x, target, _on_device(), text)

    for i, s in enumerate(settings):
        yield f"sparse verify {s}: verify pass, ctx {ctx}", BACKEND, \
            lambda s=s: ratio(s, "verify_ms", 0.6), 60.0 if i == 0 else 1.0
        yield f"sparse verify {s}: MTP round (drafts + verify), ctx {ctx}", BACKEND, \
            lambda s=s: ratio(s, "round_ms", None), 1.0


# ------------------------------------------------------------------------------ RL
def rl_items(st: ScriptSettings):
    """Async (DORA) vs sync time per trained sample under long-tailed lengths; throughputs."""
    run = ScriptRun("bench_rl.py", st.rl, st.limits[2])

    def speedup():
        s = run.get()["speedup"]
        return dict(measured=f"median {s['median']:.2f}x (min {s['min']:.2f}, max {s['max']:.2f})",
                    value=s["median"], target=">= 1.5 (CPU target)", passed=None)

    def throughput():
        rows = run.get()["rows"]
        by = {m: [r for r in rows if r["mode"] == m] for m in ("sync", "async")}
        text = ", ".join(f"{m}: rollout {max(r['rollout_tok_s'] for r in rs):.0f} tok/s, learner "
                         f"{max(r['learner_tok_s'] for r in rs):.0f} tok/s" for m, rs in by.items())
        return dict(measured=text, value=max(r["rollout_tok_s"] for r in rows), target="",
                    passed=None)

    yield "RL async / sync speed-up, long-tailed lengths", BACKEND, speedup, 60.0
    yield "RL rollout and learner tokens/s", BACKEND, throughput, 1.0
