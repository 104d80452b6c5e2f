"""Reading a training run's newest checkpoint without its trainer: the parts a caller names.

Used by serving (params and router biases) and by LoRA merging (plus the adapters); the run's
mesh does not matter, every leaf comes back as a host numpy array.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def restore_newest(run_dir: str | os.PathLike, abstract: Any) -> tuple[Any, int]:
    """(state, step): the subtree `abstract` (ShapeDtypeStructs in the layout of the saved
    TrainState, e.g. {"params": ..., "router_bias": ...}) of the newest finished checkpoint in
    `run_dir`/checkpoints, as host arrays. ValueError when there is none."""
    run_dir = pathlib.Path(run_dir)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    manager = ocp.CheckpointManager(run_dir / "checkpoints", item_names=("state", "data"))
    try:
        step = manager.latest_step()
        if step is None:
            raise ValueError(f"{run_dir} holds no finished checkpoint (looked in {run_dir / 'checkpoints'})")
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args, partial_restore=True)))["state"]
    finally:
        manager.close()
    return state, int(step)
