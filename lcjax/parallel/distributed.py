"""Multi-process start-up: one process per host joined by `jax.distributed.initialize`.

Settings come from arguments (the CLIs' `--coordinator-address/--num-processes/--process-id`),
else from the environment, first match wins per value:

    coordinator  LCJAX_COORDINATOR_ADDRESS, JAX_COORDINATOR_ADDRESS   host:port of process 0
    count        LCJAX_NUM_PROCESSES, JAX_NUM_PROCESSES
    index        LCJAX_PROCESS_ID, JAX_PROCESS_ID                     0 .. count - 1
    mode         LCJAX_DISTRIBUTED=auto|off (or `distributed=`)

`auto` lets jax detect the unset values from the cluster (Cloud TPU VMs and GKE, SLURM, Open MPI,
Kubernetes with the `kubernetes` package); `off` never initialises. With none of them set, or a
count of 1, nothing happens and the run is single-process as before. Runs before anything touches
jax devices (the CLIs call it first thing in `main`).
"""

from __future__ import annotations

import argparse
import os
from typing import Mapping, Optional, Sequence

import jax

MODES = ("auto", "off")
_ENV = {"coordinator_address": ("LCJAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
        "num_processes": ("LCJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
        "process_id": ("LCJAX_PROCESS_ID", "JAX_PROCESS_ID")}
_FLAGS = {"coordinator_address": "--coordinator-address", "num_processes": "--num-processes",
          "process_id": "--process-id"}


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None,
               distributed: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
               heartbeat_timeout_seconds: Optional[int] = None) -> bool:
    """Join the other processes of a multi-host run, if this is one; call before using devices.

    Args:
      coordinator_address, num_processes, process_id: explicit settings (win over the env).
      local_device_ids: the accelerators this process drives (default: all it sees, or jax's own
        JAX_LOCAL_DEVICE_IDS); for several processes per host.
      distributed: "auto" (jax's cluster detection fills unset values), "off" (never join),
        or None (read LCJAX_DISTRIBUTED; unset means join only when settings are given).
      environ: the environment to read (default os.environ).
      heartbeat_timeout_seconds: seconds without a heartbeat after which jax's coordination
        service declares a process dead and stops the others (None: jax's default, 100).
    Returns True when `jax.distributed.initialize` was called.
    Raises ValueError naming the setting (and the variable it came from) when the settings are
    partial, malformed or inconsistent.
    """
    env = os.environ if environ is None else environ
    mode = distributed if distributed is not None else env.get("LCJAX_DISTRIBUTED") or None
    if mode is not None and mode not in MODES:
        source = "--distributed" if distributed is not None else "$LCJAX_DISTRIBUTED"
        raise ValueError(f"{source}={mode!r} is invalid: expected one of {MODES}")
    if mode == "off":
        return False
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    values, sources = {}, {}
    for key, value in given.items():
        values[key], sources[key] = value, _FLAGS[key]
        if value is None:
            var = next((v for v in _ENV[key] if env.get(v)), None)
            if var is not None:
                values[key], sources[key] = env[var], f"${var}"
    values["num_processes"] = _as_int(values["num_processes"], sources["num_processes"], minimum=1)
    values["process_id"] = _as_int(values["process_id"], sources["process_id"], minimum=0)
    address, count, index = (values[k] for k in given)
    named = {k: f"{sources[k]}={values[k]!r}" for k in given if values[k] is not None}
    if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise ValueError(f"{named['coordinator_address']} is invalid: expected host:port of process 0")
    if count is not None and index is not None and index >= count:
        raise ValueError(f"{named['process_id']} is invalid: expected an integer in "
                         f"[0, {named['num_processes']})")
    if mode != "auto":
        if count == 1 or all(v is None for v in values.values()):
            return False  # single process
        missing = [f"{_FLAGS[k]} (or ${_ENV[k][0]})" for k in given if values[k] is None]
        if missing:
            raise ValueError(f"multi-process settings {', '.join(named.values())} are missing "
                             f"{' and '.join(missing)}: give all three (coordinator, process "
                             f"count, process id), or set LCJAX_DISTRIBUTED=auto on a cluster jax "
                             f"detects")
    # Cross-process collectives of the CPU backend (tests, CPU clusters); leaves a user's choice
    # (e.g. JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi) alone, and GPU/TPU backends ignore it.
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in env:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    extra = {} if heartbeat_timeout_seconds is None else {"heartbeat_timeout_seconds": heartbeat_timeout_seconds}
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index, local_device_ids=local_device_ids, **extra)
    return True


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """--coordinator-address / --num-processes / --process-id / --distributed, for a CLI."""
    group = parser.add_argument_group("multi-host (default: $LCJAX_* / $JAX_* env vars, else one "
                                      "process)")
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="process 0's address, the same on every process")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes (one per host)")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. N-1")
    group.add_argument("--distributed", choices=MODES,
                       help="auto: let jax detect the cluster (TPU pod, SLURM, Open MPI); "
                            "off: single process whatever the env says")


def initialize_from_flags(args: argparse.Namespace, **kwargs) -> bool:
    """`initialize` with the flags of `add_distributed_flags` (and `initialize`'s keyword
    arguments, e.g. heartbeat_timeout_seconds)."""
    return initialize(args.coordinator_address, args.num_processes, args.process_id,
                      distributed=args.distributed, **kwargs)


def is_primary() -> bool:
    """True in process 0, the one that logs, prints and writes run files."""
    return jax.process_index() == 0


def broadcast_from_primary(tree):
    """Process 0's values of a pytree of host arrays, in every process (each passes arrays of
    the same shapes and dtypes; the others' values are ignored). One small jitted sum over all
    devices, compiled once per shape; in a single process the tree comes back as numpy."""
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)


def _as_int(value, source: str, minimum: int) -> Optional[int]:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum or (isinstance(value, float) and value != number):
        raise ValueError(f"{source}={value!r} is invalid: expected an integer >= {minimum}")
    return number
