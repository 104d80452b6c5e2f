"""Orbax checkpoints of a run: the TrainState plus the data iterator's state, atomically.

CheckpointManager writes each step to a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact; `latest_step` only sees finished ones.
In a multi-process run every process calls save / restore and orbax coordinates them through
jax.distributed: each process writes and reads its own array shards, process 0 the data-iterator
JSON (identical on every process) and the commit; the directory must be shared by all hosts.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from lcjax.train.state import TrainState


def check_writable(run_dir: str) -> None:
    """Create run_dir and run_dir/checkpoints and write a probe file in each, before any work.

    Raises a ValueError naming train.run_dir; otherwise an unwritable checkpoint folder shows
    only when the first save's background thread times out, minutes into the run.
    """
    for path in (run_dir, os.path.join(run_dir, "checkpoints")):
        probe = os.path.join(path, f".write-probe-{os.getpid()}")
        try:
            os.makedirs(path, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise ValueError(f"train.run_dir={run_dir!r}: cannot write {err.filename or path}: "
                             f"{reason}") from None


class RunCheckpoints:
    """Save / restore (state, data-iterator JSON) under <run_dir>/checkpoints."""

    def __init__(self, run_dir: str, keep: int, async_save: bool = True):
        # cleanup_tmp_directories: a save cut short by a kill leaves a temporary folder; the
        # next run removes it (it was never a checkpoint: latest_step() never saw it).
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: TrainState, data_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state)))

    def restore(self, step: int, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, dict]:
        """State placed with `shardings` (no host round trip) and the data-iterator state."""
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(run_dir: str, abstract_params: Any) -> Any:
    """Only the params of the newest checkpoint in `run_dir` (for init_from / growth)."""
    return restore_init(run_dir)[0]


def restore_init(run_dir: str) -> tuple[Any, Any]:
    """(params, router_bias) of the newest checkpoint in `run_dir`: what a run started with
    `train.init_from` takes over (the router bias is trained state of the model too)."""
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "checkpoints")),
                                    item_names=("state", "data"))
    step = manager.latest_step()
    if step is None:
        raise ValueError(f"train.init_from={run_dir!r} holds no checkpoint (looked in "
                         f"{os.path.join(run_dir, 'checkpoints')})")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
    manager.close()
    return restored["state"]["params"], restored["state"].get("router_bias")
