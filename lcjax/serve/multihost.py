"""Multi-host serving: one engine sharded over the devices of several processes (SPMD).

Process 0 (the leader) runs HTTP and the scheduler. Before each step it broadcasts the step's
batch plan to the other processes (followers) with `parallel.distributed.broadcast_from_primary`:
first a fixed int32 header [kind, rows, length, static, has_bias] (kind: prefill, decode,
speculative round, keep-alive or stop), then the host arrays that step consumes (token ids,
slots, starts, lengths, block tables, reset flags, seeds, sampling parameters, follow tokens;
the [rows, V] logit bias only when some row has one). Every process then calls the same
jitted, sharded step on the same global arrays; only the leader reads the results. Each
follower holds its own replica of the engine state (placed by the same shardings) and builds
its payload templates with the engine's own input builder, so shapes agree by construction.

While idle the leader broadcasts a keep-alive every `IDLE_INTERVAL` seconds, so followers never
sit in one collective for long and a dead follower is noticed within about a second. A failed
broadcast or step means the process group is broken (a peer died, or the processes fell out of
step): the process prints one line naming the cause and exits with `EXIT_PEER_LOST` rather
than wait on a collective that will never complete.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lcjax.parallel.distributed import broadcast_from_primary

PREFIX = "lcjax.serve:"
STOP, KEEPALIVE, PREFILL, DECODE, SPECULATIVE = -1, 0, 1, 2, 3
HEADER_SIZE = 8  # [kind, rows, length, static, has_bias, 0, 0, 0]
IDLE_INTERVAL = 1.0
EXIT_PEER_LOST = 3


def is_multihost() -> bool:
    return jax.process_count() > 1


def check_mesh(mesh) -> None:
    """ValueError unless `mesh` spans every device of every process (each must take part)."""
    if mesh.size != jax.device_count():
        raise ValueError(f"multi-host serving needs a mesh over all {jax.device_count()} devices "
                         f"of the {jax.process_count()} processes, got {mesh.size}: set the mesh "
                         "sizes to cover them (e.g. mesh.tensor=-1, or mesh.expert=4 mesh.tensor=-1)")


def put_global(tree: Any, shardings: Any) -> Any:
    """Global arrays of `tree` (host values, the same in every process) placed by `shardings`
    (a tree of NamedShardings, or one for every leaf)."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def _local(x: Any) -> Any:
    """A replicated global array as a local one the host can read (other values unchanged)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x.addressable_data(0)
    return x


def _fatal(role: str, err: BaseException) -> None:
    print(f"{PREFIX} error: multi-host serving stopped in process {jax.process_index()} ({role}): "
          f"the process group is broken, a peer process most likely died ({type(err).__name__}: "
          f"{str(err).splitlines()[0] if str(err) else ''}); exiting", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


class _Plan:
    """Packing of one step's arguments into broadcastable host arrays, and back."""

    def __init__(self, engine):
        self.engine = engine
        self.replicated = NamedSharding(engine.parallelism.mesh, PartitionSpec())

    def template(self, kind: int, rows: int, length: int) -> tuple:
        """Step arguments of this shape, all zeros (the engine's own builder, as in warm-up)."""
        inp = self.engine._inputs([], rows, np.zeros((rows, length), np.int32), [], [], [])
        inp = jax.tree.map(np.asarray, inp)
        return (inp, np.zeros((rows,), np.int32)) if kind == PREFILL else (inp,)

    @staticmethod
    def wire(args: tuple, has_bias: bool) -> list:
        """Leaves to broadcast (bools as int32: the broadcast sums over processes)."""
        inp = args[0] if has_bias else args[0].replace(bias=None)
        return [np.asarray(x).astype(np.int32) if np.asarray(x).dtype == bool else np.asarray(x)
                for x in jax.tree.leaves((inp, *args[1:]))]

    def unwire(self, leaves: list, template: tuple, has_bias: bool) -> tuple:
        inp = template[0] if has_bias else template[0].replace(bias=None)
        like = (inp, *template[1:])
        flat, treedef = jax.tree.flatten(like)
        values = [np.asarray(v).astype(t.dtype) for v, t in zip(leaves, flat, strict=True)]
        args = jax.tree.unflatten(treedef, values)
        if not has_bias:
            args = (args[0].replace(bias=template[0].bias), *args[1:])
        return args

    def globalize(self, args: tuple) -> tuple:
        return put_global(args, self.replicated)


def _static(kind: int, value: int) -> dict:
    if kind == PREFILL:
        return {"speculative": bool(value)}
    return {"num_draft": int(value)} if kind == SPECULATIVE else {}


class _LeaderStep:
    """One of the engine's steps on the leader: broadcast the batch plan, then run it."""

    def __init__(self, step, kind: int, leader: "Leader"):
        self.step, self.kind, self.leader = step, kind, leader

    def __call__(self, variables, state, *args, **static):
        plan = self.leader.plan
        args = tuple(jax.tree.map(np.asarray, a) for a in args)
        has_bias = bool(np.any(args[0].bias))
        value = int(static.get("speculative", static.get("num_draft", 0)))
        header = [self.kind, args[0].tokens.shape[0], args[0].tokens.shape[1], value, int(has_bias)]
        try:
            with self.leader.lock:
                self.leader.broadcast(np.array(header + [0] * (HEADER_SIZE - len(header)), np.int32))
                self.leader.broadcast(plan.wire(args, has_bias))
                out = self.step(variables, state, *plan.globalize(args), **static)
                out = (out[0],) + tuple(jax.tree.map(_local, o) for o in out[1:])
                jax.block_until_ready(out[1])  # a broken group fails here, not in a later read
        except Exception as err:  # noqa: BLE001 - the group is broken: exit, do not hang
            _fatal("leader", err)
        return out

    def lower(self, *args, **static):
        return self.step.lower(*args, **static)


class Leader:
    """The engine on process 0, its steps broadcast to the followers. Delegates everything else
    to the engine; `idle()` sends a keep-alive and `stop_followers()` ends the followers."""

    idle_interval = IDLE_INTERVAL

    def __init__(self, engine):
        self.engine = engine
        self.plan = _Plan(engine)
        self.lock = threading.Lock()
        self._stopped = False
        engine._prefill = _LeaderStep(engine._prefill, PREFILL, self)
        engine._decode = _LeaderStep(engine._decode, DECODE, self)
        engine._spec = _LeaderStep(engine._spec, SPECULATIVE, self)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    @staticmethod
    def broadcast(tree: Any) -> Any:
        return broadcast_from_primary(tree)

    def _header(self, kind: int) -> None:
        try:
            with self.lock:
                self.broadcast(np.array([kind] + [0] * (HEADER_SIZE - 1), np.int32))
        except Exception as err:  # noqa: BLE001
            _fatal("leader", err)

    def idle(self) -> None:
        """Keep-alive while no request runs (and a liveness check of the followers)."""
        if not self._stopped:
            self._header(KEEPALIVE)

    def stop_followers(self) -> None:
        """Tell the followers to exit 0 (idempotent)."""
        if not self._stopped:
            self._header(STOP)
            self._stopped = True


def follow(engine, verbose: bool = True) -> int:
    """Run the leader's steps on this process until it says stop; returns the exit status."""
    plan = _Plan(engine)
    steps = {PREFILL: engine._prefill, DECODE: engine._decode, SPECULATIVE: engine._spec}
    templates: dict = {}
    if verbose:
        print(f"{PREFIX} process {jax.process_index()} of {jax.process_count()}: following "
              "process 0's steps", flush=True)
    try:
        while True:
            header = broadcast_from_primary(np.zeros(HEADER_SIZE, np.int32))
            kind, rows, length, value, has_bias = (int(v) for v in header[:5])
            if kind == STOP:
                return 0
            if kind == KEEPALIVE:
                continue
            if kind not in steps:
                raise ValueError(f"unknown step kind {kind} in the batch plan header {header}")
            key = (kind, rows, length)
            if key not in templates:
                templates[key] = plan.template(kind, rows, length)
            zeros = plan.wire(templates[key], bool(has_bias))
            args = plan.unwire(broadcast_from_primary(zeros), templates[key],
                               bool(has_bias))
            out = steps[kind](engine.variables, engine.state, *plan.globalize(args),
                              **_static(kind, value))
            engine.state = out[0]
    except Exception as err:  # noqa: BLE001
        _fatal("follower", err)
    return EXIT_PEER_LOST  # not reached: _fatal exits
