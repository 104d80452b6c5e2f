"""Orbax checkpoints of an RL run: the learner state (params, Adam moments, version) and a JSON
of everything else the run needs to continue (environment RNG, the problems of groups still
in flight, the staleness histogram, counters).

The same guarantees as training's (lcjax.train.checkpoint): each step is written to a
temporary directory and renamed when complete, so a run killed at any moment (kill -9
included) resumes from its newest complete checkpoint; groups in flight at a save are
recorded as problems and restarted on the restored version, so none is lost.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class RLCheckpoints:
    def __init__(self, run_dir: str, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("learner", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, learner_state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(learner=ocp.args.StandardSave(learner_state),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            learner=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out["learner"], out["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
