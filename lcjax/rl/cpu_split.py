"""Host cores split between the rollout (this process) and a learner process on a CPU backend.

Two XLA CPU computations in flight at once slow each other down even in separate processes:
each process's intra-op pool spreads its ops over every core, so the rollout's small decode
ops wait behind the learner's matmuls. Giving each side its own cores (Linux CPU affinity)
keeps the rollout near its solo speed; the rollout's decode steps use about one core anyway
(scripts/bench_rl_contention.py).

`learner.cpus`: "auto" (the learner takes half the cores, rounded down, at least one, when there
are at least two, and only on a CPU backend), "all" (no split), or a list such as "1" or "2-3,6"
(the learner's cores; the rollout keeps the rest).
"""

from __future__ import annotations

import os
from typing import Optional


def parse_cpus(spec: str) -> set[int]:
    """"2-3,6" -> {2, 3, 6}; ValueError naming `spec` on anything else."""
    cpus: set[int] = set()
    try:
        for part in spec.split(","):
            lo, dash, hi = part.strip().partition("-")
            first, last = int(lo), int(hi if dash else lo)
            if first < 0 or last < first:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError:
        raise ValueError(f"learner.cpus={spec!r}: expected auto, all, or core numbers such as "
                         f"'1' or '2-3,6'") from None
    return cpus


def check_cpus(spec: str) -> None:
    if spec not in ("auto", "all"):
        parse_cpus(spec)


def split_cpus(spec: str, available: set[int], backend: str) -> Optional[tuple[set[int], set[int]]]:
    """(learner cores, rollout cores), or None when both should share every core."""
    if spec == "all" or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(available)
    if spec == "auto":
        if backend != "cpu" or len(cores) < 2:
            return None
        learner = set(cores[len(cores) - len(cores) // 2:])
    else:
        learner = parse_cpus(spec)
        if not learner <= available:
            raise ValueError(f"learner.cpus={spec!r}: cores {sorted(learner - available)} are not "
                             f"available to this process (it may use {cores})")
        if learner == available:
            raise ValueError(f"learner.cpus={spec!r} takes every core ({cores}); leave at least "
                             f"one to the rollout, or use learner.cpus=all to share them")
    return learner, available - learner


def available_cpus() -> set[int]:
    """The cores this process may run on (empty where the OS has no CPU affinity)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


def auto_placement() -> str:
    """learner.placement=auto: "process" on a CPU backend with two or more cores (each side
    gets its own), else "thread" (an accelerator runs both sides' work)."""
    import jax

    return "process" if jax.default_backend() == "cpu" and len(available_cpus()) >= 2 else "thread"


def pin_process(cpus: set[int]) -> dict[int, set[int]]:
    """Pin every thread of this process (XLA's pools included) to `cpus`; threads started
    later inherit it from their parent thread. Returns each thread's previous mask."""
    before = {}
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        try:
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            before.pop(tid, None)
    return before


def unpin_process(before: dict[int, set[int]], default: set[int]) -> None:
    """Give every thread its mask back (threads started while pinned get `default`)."""
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        try:
            os.sched_setaffinity(tid, before.get(tid, default))
        except OSError:
            pass
