"""Timing for the benchmark scripts: pipelined calls, one sync, median over repeats."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import jax


def time_pipelined(fn: Callable, args: Sequence, calls: int, repeats: int) -> float:
    """Seconds per call: `calls` calls issued back to back, one sync; median of `repeats`."""
    jax.block_until_ready(fn(*args))  # compile + warm-up
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)
