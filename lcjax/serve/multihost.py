"""Multi-host serving: one engine sharded over the devices of several processes (SPMD).

Process 0 (the leader) runs HTTP and the scheduler. Before each step it broadcasts the step's
batch plan to the other processes (followers) with `parallel.distributed.broadcast_from_primary`:
one int32 message of fixed size, an int32 header [kind, rows, length, static, has_bias] (kind:
prefill, decode, speculative round, keep-alive or stop), then the host arrays that step
consumes (token ids, slots, starts, lengths, block tables, reset flags, seeds, sampling
parameters, follow tokens), and the [rows, V] logit bias in a second message only when some
row has one. Every process then calls the same
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


_KINDS = {"prefill": PREFILL, "decode": DECODE, "speculative": SPECULATIVE}


class _Plan:
    """The wire format: one int32 message of fixed size per step, the header then every argument
    leaf's 4-byte words (bools as 0/1) in tree order; the logit bias travels in a second message
    only when some row has one. The size is the largest step of `engine.compile_plan()`, so
    every process knows it without being told, and the broadcast compiles once."""

    def __init__(self, engine):
        self.engine = engine
        self.replicated = NamedSharding(engine.parallelism.mesh, PartitionSpec())
        self._templates: dict = {}
        shapes = [(_KINDS[s[0]], s[1], s[2] if s[0] == "prefill" else 1) for s in engine.compile_plan()]
        odd = [x.dtype for x in self._leaves(self.template(*shapes[0]), True)
               if x.dtype != bool and x.dtype.itemsize != 4]
        if odd:
            raise ValueError(f"step inputs of dtype {odd[0]}: the batch plan carries 4-byte words")
        self.size = HEADER_SIZE + max(sum(x.size for x in self._leaves(self.template(*k), False))
                                      for k in shapes)

    def template(self, kind: int, rows: int, length: int) -> tuple:
        """Step arguments of this shape, all zeros (the engine's own builder, as in warm-up)."""
        key = (kind, rows, length)
        if key not in self._templates:
            inp = self.engine._inputs([], rows, np.zeros((rows, length), np.int32), [], [], [])
            inp = jax.tree.map(np.asarray, inp)
            self._templates[key] = (inp, np.zeros((rows,), np.int32)) if kind == PREFILL else (inp,)
        return self._templates[key]

    @staticmethod
    def _leaves(args: tuple, has_bias: bool) -> list:
        inp = args[0] if has_bias else args[0].replace(bias=None)
        return jax.tree.leaves((inp, *args[1:]))

    def encode(self, header: list, args: tuple) -> np.ndarray:
        """int32 [size]: the header, then the leaves' words (the bias excluded)."""
        words = [np.asarray(header, np.int32)]
        for x in self._leaves(args, False):
            x = np.ascontiguousarray(x)
            words.append(x.astype(np.int32) if x.dtype == bool else x.view(np.int32).ravel())
        flat = np.concatenate([w.ravel() for w in words])
        return np.concatenate([flat, np.zeros(self.size - flat.size, np.int32)])

    def decode(self, message: np.ndarray, header: list, bias: Any = None) -> tuple:
        """The step arguments of a message (`bias` [rows, V], or None for zeros)."""
        kind, rows, length = header[:3]
        template = self.template(kind, rows, length)
        flat, treedef = jax.tree.flatten(((template[0].replace(bias=None)), *template[1:]))
        values, at = [], HEADER_SIZE
        for t in flat:
            words = message[at: at + t.size]
            at += t.size
            values.append((words != 0) if t.dtype == bool else words.view(t.dtype).reshape(t.shape))
        args = jax.tree.unflatten(treedef, values)
        return (args[0].replace(bias=template[0].bias if bias is None else bias), *args[1:])

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
        header += [0] * (HEADER_SIZE - len(header))
        try:
            with self.leader.lock:
                broadcast_from_primary(plan.encode(header, args))
                if has_bias:
                    broadcast_from_primary(args[0].bias)
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

    def _header(self, kind: int) -> None:
        try:
            with self.lock:
                message = np.zeros(self.plan.size, np.int32)
                message[0] = kind
                broadcast_from_primary(message)
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
    if verbose:
        print(f"{PREFIX} process {jax.process_index()} of {jax.process_count()}: following "
              "process 0's steps", flush=True)
    try:
        while True:
            message = broadcast_from_primary(np.zeros(plan.size, np.int32))
            header = [int(v) for v in message[:HEADER_SIZE]]
            kind, rows, _, value, has_bias = header[:5]
            if kind == STOP:
                return 0
            if kind == KEEPALIVE:
                continue
            if kind not in steps:
                raise ValueError(f"unknown step kind {kind} in the batch plan header {header}")
            bias = None
            if has_bias:
                vocab = plan.template(*header[:3])[0].bias.shape[1]
                bias = broadcast_from_primary(np.zeros((rows, vocab), np.float32))
            args = plan.decode(np.asarray(message), header, bias)
            out = steps[kind](engine.variables, engine.state, *plan.globalize(args),
                              **_static(kind, value))
            engine.state = out[0]
    except Exception as err:  # noqa: BLE001
        _fatal("follower", err)
    return EXIT_PEER_LOST  # not reached: _fatal exits
