"""Test-session setup: jaxtyping runtime checks, fast CPU compiles, one persistent XLA cache.

Installed before any lcjax / pallas_kernels module is imported, so a wrong rank or a mismatched
dimension fails at trace time in every test (STYLE habit 1). Many tests build the same tiny
model and train step; with a persistent compilation cache (a fresh temporary folder per session,
shared with subprocess tests, unless JAX_COMPILATION_CACHE_DIR is set) every compile after the
first is a disk read (a tiny training run: ~48 s -> ~8 s on 2 cores).
"""

import os
import shutil
import tempfile
import time

# Tests run tiny shapes, where XLA's CPU compile dominates: skip LLVM's backend optimisation
# (about 2-3x faster compiles; results are unchanged).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

_OWNED_CACHE = []
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWNED_CACHE.append(tempfile.mkdtemp(prefix="lcjax-test-xla-cache-"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWNED_CACHE[0]  # inherited by subprocess tests
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from jaxtyping import install_import_hook  # noqa: E402

if os.environ.get("LCJAX_TYPECHECK", "1") != "0":
    install_import_hook(["lcjax", "pallas_kernels"], "beartype.beartype")


def pytest_addoption(parser):
    parser.addoption("--slow-budget", type=float, default=0.0, metavar="SECONDS",
                     help="skip the `slow` tests that would start later than SECONDS after the "
                          "session began (0: no limit); each is reported as skipped, naming the budget")


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each holds its own JAX runtime and compiles)."""
    del config
    return max(1, min(len(os.sched_getaffinity(0)), 4))


_SESSION_START = [time.monotonic()]


def pytest_sessionstart(session):
    del session
    _SESSION_START[0] = time.monotonic()


def pytest_runtest_setup(item):
    budget = item.config.getoption("slow_budget")
    if budget > 0 and item.get_closest_marker("slow") is not None:
        elapsed = time.monotonic() - _SESSION_START[0]
        if elapsed > budget:
            import pytest
            pytest.skip(f"--slow-budget={budget:g}s spent ({elapsed:.0f}s into the session)")


def pytest_configure(config):
    del config
    import jax  # a plugin may have imported jax before the variables above were set
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config):
    del config
    for path in _OWNED_CACHE:
        shutil.rmtree(path, ignore_errors=True)
