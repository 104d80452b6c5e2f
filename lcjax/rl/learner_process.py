"""The learner in its own process, behind the same interface as `Learner`
(`learner.placement=process`).

In one process the rollout's decode step and the learner's update share one XLA thread pool,
and on a CPU host the decode step slows down 1.7-2x while the learner trains (2 cores,
scripts/bench_rl_contention.py). A child process has its own pool and its own GIL, and on a CPU
backend its own cores (`learner.cpus`, lcjax.rl.cpu_split): the child is pinned to them and this
process's threads to the rest while the learner lives. The parent sends packed batches (numpy)
and gets back each new version's params; the full state (params and Adam moments) crosses only
for checkpoints and restores. The initial weights go through the pipe too, not the spawn
arguments, so a child that dies while starting is an error here, never a parent blocked on
writing them.

The child exits when the pipe closes, so a parent killed at any moment (kill -9 included)
leaves no learner behind; it ignores SIGINT and SIGTERM, which the parent handles by
finishing its step and saving.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from typing import Any, Optional

import jax
import numpy as np

from lcjax.config import ModelConfig
from lcjax.model import BIAS_COLLECTION
from lcjax.rl.cpu_split import available_cpus, pin_process, split_cpus, unpin_process
from lcjax.rl.config import LearnerConfig
from lcjax.rl.learner import Batch, Learner, LearnerState
from lcjax.rl.objective import ObjectiveConfig


def _host(tree: Any) -> Any:
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _child_main(conn, model_cfg: ModelConfig, cfg: LearnerConfig, obj_cfg: ObjectiveConfig,
                t_max: int, cpus: Optional[set]) -> None:
    """Take the initial variables, then serve (op, payload) requests on `conn` until "close"
    or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if cpus:  # before XLA starts its thread pools, which inherit the mask
        os.sched_setaffinity(0, cpus)
    try:
        variables = conn.recv()
    except (EOFError, OSError):
        return
    learner = Learner(model_cfg, variables, cfg, obj_cfg, t_max)
    ops = {
        "step": lambda batch: (learner.step(batch), _host(learner.state.params)),
        "warmup": lambda shape: learner.warmup(*shape),
        "get_state": lambda _: _host(learner.state),
        "set_state": lambda state: learner.set_state(state),
    }
    conn.send(("ok", None))
    while True:
        try:
            op, payload = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if op == "close":
            conn.send(("ok", None))
            return
        try:
            reply = ("ok", ops[op](payload))
        except Exception:  # reported to the parent, which raises it
            reply = ("error", traceback.format_exc())
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


class ProcessLearner:
    """`Learner`'s interface (step, version, variables, get_state / set_state, warmup) with the
    update running in a spawned child process."""

    def __init__(self, model_cfg: ModelConfig, variables: dict, cfg: LearnerConfig,
                 obj_cfg: ObjectiveConfig, t_max: int):
        host = _host({"params": variables["params"], BIAS_COLLECTION: variables[BIAS_COLLECTION]})
        self.router_bias = jax.tree.map(jax.numpy.asarray, host[BIAS_COLLECTION])
        self._params = jax.tree.map(jax.numpy.asarray, host["params"])
        self._version = 0
        self._closed = False
        self._closed_state: Optional[LearnerState] = None
        self._pinned: Optional[dict] = None  # each thread's mask before the rollout was pinned
        available = available_cpus()
        split = split_cpus(cfg.cpus, available, jax.default_backend())
        self.cpus = split  # (learner cores, rollout cores), or None: shared
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, name="lcjax-rl-learner", daemon=True,
                                 args=(child, model_cfg, cfg, obj_cfg, t_max, split and split[0]))
        self._proc.start()
        child.close()
        self._send(host)
        self._recv()  # the child built its learner
        if split is not None:
            self._available = available
            self._pinned = pin_process(split[1])

    # ---------------------------------------------------------------------------- transport
    def _recv(self) -> Any:
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            raise RuntimeError(f"the learner process exited (code {self._proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"the learner process failed:\n{value}")
        return value

    def _send(self, message: Any) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, OSError):
            self._proc.join(5)
            raise RuntimeError(f"the learner process exited (code {self._proc.exitcode})") from None

    def _call(self, op: str, payload: Any = None) -> Any:
        if self._closed:
            raise RuntimeError(f"the learner process is closed (asked for {op!r})")
        self._send((op, payload))
        return self._recv()

    # ---------------------------------------------------------------------------- interface
    @property
    def version(self) -> int:
        return self._version

    @property
    def state(self) -> LearnerState:
        """The full state (params, optimizer moments, step) as numpy, fetched from the child."""
        if self._closed:
            if self._closed_state is None:
                raise RuntimeError("the learner process exited before its state was fetched")
            return self._closed_state
        return self.get_state()

    def variables(self) -> dict:
        """What the rollout engines run: {"params", "router_bias"} (device arrays)."""
        return {"params": self._params, BIAS_COLLECTION: self.router_bias}

    def step(self, batch: Batch) -> dict:
        """One batch's update(s) in the child; the new params come back as the next version."""
        metrics, params = self._call("step", _host(batch))
        self._params = jax.tree.map(jax.numpy.asarray, params)
        self._version += 1
        return metrics

    def get_state(self) -> LearnerState:
        return self._call("get_state")

    def set_state(self, state: LearnerState) -> None:
        state = _host(state)
        self._call("set_state", state)
        self._params = jax.tree.map(jax.numpy.asarray, state.params)
        self._version = int(state.step)

    def warmup(self, max_rows: int, length: int) -> None:
        self._call("warmup", (max_rows, length))

    def close(self) -> None:
        """Stop the child; `state` stays readable (the last state, fetched before it stops)."""
        if self._closed:
            return
        try:
            if self._proc.is_alive():
                state = self.get_state()
                self._call("close")
                self._closed_state = state
        finally:
            self._closed = True
            if self._pinned is not None:  # the rollout gets every core back
                unpin_process(self._pinned, self._available)
                self._pinned = None
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()
