"""AsyncEngine: the synchronous Engine driven by one background thread, consumed from asyncio.

The Engine is not thread-safe, so exactly one thread (started here) ever calls it. Coroutines
talk to that thread through a command deque (add / abort / stop) that it applies before each
`engine.step()`; each step's outputs go back to per-request `asyncio.Queue`s through
`loop.call_soon_threadsafe`. With nothing to do the thread sleeps on a threading.Event, so an
idle server costs no CPU.

A request whose consumer goes away (client disconnect: the stream is closed or its task
cancelled) is aborted, which frees its KV pages. If `engine.step()` raises, the requests in
flight fail with EngineError (their consumers see it, the HTTP layer answers 500) and are
aborted; the thread keeps serving new requests.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from lcjax.serve.metrics import ServingMetrics
from lcjax.serve.outputs import EngineStats, RequestOutput

log = logging.getLogger("lcjax.serve")


class EngineError(RuntimeError):
    """engine.step() raised while this request was in flight."""


class EngineShutdown(RuntimeError):
    """The engine thread is stopping or stopped; no new requests."""


@dataclasses.dataclass
class _Stream:
    """Engine-thread side of one request: where its outputs go."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_token_ids: list[int]
    last: Optional[RequestOutput] = None


class RequestStream:
    """Async iterator over the outputs of one or more requests (n > 1 shares one stream).

    Outputs of different requests interleave in engine order; each request's last output has
    `finished=True` and iteration ends when all have finished. `close()` (also run when the
    consumer is cancelled while waiting) aborts every request that has not finished.
    """

    def __init__(self, owner: "AsyncEngine", request_ids: Sequence[str], queue: asyncio.Queue):
        self.request_ids = list(request_ids)
        self._owner, self._queue = owner, queue
        self._pending = set(self.request_ids)

    @property
    def finished(self) -> bool:
        return not self._pending

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._pending:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled: the consumer is gone
            self.close()
            raise
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:
            self._pending.discard(item.request_id)
        return item

    def close(self) -> None:
        for request_id in sorted(self._pending):
            self._owner.abort(request_id)
        self._pending.clear()


class AsyncEngine:
    """Owns an Engine and the one thread allowed to call it.

    Args:
      engine: a `lcjax.serve.engine.Engine` (or anything with add_request / abort / step /
        has_unfinished / stats).
      metrics: where request timings and token counts are recorded (None: a fresh registry).
      start: start the thread now (tests may want to enqueue first).
    """

    def __init__(self, engine: Any, metrics: Optional[ServingMetrics] = None, start: bool = True):
        self.engine = engine
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self._commands: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._stats: Optional[EngineStats] = None
        self._unapplied_adds = 0  # sent by coroutines, not yet taken by the engine thread
        self._adds_lock = threading.Lock()
        self._stopping = False  # set by the engine thread on "stop"
        self._closed = False  # set by shutdown(): add_request refuses from then on
        self.num_step_errors = 0
        self._thread = threading.Thread(target=self._run, name="lcjax-engine", daemon=True)
        if start:
            self.start()

    # ------------------------------------------------------------ asyncio side

    def start(self) -> None:
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._closed

    async def add_request(self, prompt_token_ids: Sequence[int], params: Any,
                          request_id: Optional[str] = None,
                          logits_processor: Optional[Callable] = None) -> RequestStream:
        """Queue one request; returns its stream once the engine has accepted it.

        logits_processor: see `lcjax.serve.engine` (called on the engine thread).
        Raises ValueError (from `engine.add_request`: prompt too long, bad params, ...) or
        EngineShutdown.
        """
        return await self.add_requests([(prompt_token_ids, params, request_id, logits_processor)])

    async def add_requests(self, requests: Sequence[tuple]) -> RequestStream:
        """Queue several (prompt ids, params, request id or None[, logits processor or None]) at
        once; one shared stream (n > 1: one processor per sequence, or one shared processor
        that depends only on the token ids it is given).

        All or nothing: if the engine rejects any, the others are aborted and its error raised.
        """
        if not self.is_running:
            raise EngineShutdown("the engine is shutting down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        ids, futures = [], []
        for prompt_token_ids, params, request_id, *rest in requests:
            processor = rest[0] if rest else None
            request_id = request_id or uuid.uuid4().hex
            accepted: asyncio.Future = loop.create_future()
            self._send(("add", request_id, _Stream(loop, queue, list(prompt_token_ids)), params,
                        accepted, processor))
            ids.append(request_id)
            futures.append(accepted)
        stream = RequestStream(self, ids, queue)
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            stream.close()  # the aborts run after the adds: commands apply in order
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            stream.close()
            raise errors[0]
        return stream

    async def generate(self, prompt_token_ids: Sequence[int], params: Any,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request until it finishes; stopping early aborts it."""
        stream = await self.add_request(prompt_token_ids, params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, never blocks); unknown or finished ids are ignored."""
        self._send(("abort", request_id))

    def stats(self) -> Optional[EngineStats]:
        """The engine's stats as of its last step or command (None before the thread ran), with
        requests sent but not yet taken by the engine thread (it is inside a step) counted as
        waiting, so /metrics is current while a long step runs."""
        with self._adds_lock:
            stats, unapplied = self._stats, self._unapplied_adds
        if stats is None:
            return None
        return dataclasses.replace(stats, num_waiting=stats.num_waiting + unapplied)

    def shutdown(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop the thread. drain=True lets running requests finish (up to `timeout` seconds,
        then they are aborted); drain=False aborts them at once. Idempotent."""
        self._closed = True
        if not self._thread.is_alive():
            return
        self._send(("stop", drain))
        self._thread.join(timeout)
        if self._thread.is_alive() and drain:
            self._send(("stop", False))
            self._thread.join()

    def _send(self, command: tuple) -> None:
        if command[0] == "add":
            with self._adds_lock:
                self._unapplied_adds += 1
        self._commands.append(command)
        self._wake.set()

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        failures = 0
        self._refresh_stats()
        while True:
            self._wake.clear()  # before reading commands, so a later _send always wakes us
            self._apply_commands()
            try:
                busy = self.engine.has_unfinished()
            except Exception as err:  # noqa: BLE001 - never let the thread die
                busy = self._fail_all(err)
            if not busy:
                self._refresh_stats()
                if self._stopping:
                    break
                # An engine with `idle_interval` (a multi-host leader) gets `idle()` calls while
                # nothing runs: its keep-alive to the other processes.
                interval = getattr(self.engine, "idle_interval", None)
                if not self._wake.wait(interval) and interval is not None:
                    self.engine.idle()
                continue
            if self._step():
                failures = 0
            else:
                failures += 1
                # A persistently broken engine: back off instead of spinning on errors.
                time.sleep(min(0.01 * failures, 1.0))
        self._finish_all()

    def _apply_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            kind = command[0]
            try:
                if kind == "add":
                    try:
                        self._add(*command[1:])
                    finally:
                        with self._adds_lock:  # the engine's count replaces ours atomically
                            self._refresh_stats()
                            self._unapplied_adds -= 1
                elif kind == "abort":
                    self._abort(command[1])
                elif kind == "stop":
                    self._stopping = True
                    if not command[1]:
                        for request_id in list(self._streams):
                            self._abort(request_id)
            except Exception:  # noqa: BLE001
                log.exception("lcjax.serve: engine command %r failed", kind)

    def _add(self, request_id: str, stream: _Stream, params: Any, accepted: asyncio.Future,
             processor: Optional[Callable] = None) -> None:
        if self._stopping:
            _resolve(stream.loop, accepted, EngineShutdown("the engine is shutting down"))
            return
        try:
            extra = {} if processor is None else {"logits_processor": processor}
            self.engine.add_request(stream.prompt_token_ids, params, request_id=request_id, **extra)
        except Exception as err:  # noqa: BLE001 - ValueError for bad input; anything else too
            _resolve(stream.loop, accepted, err)
            return
        self._streams[request_id] = stream
        _resolve(stream.loop, accepted, None)

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        try:
            self.engine.abort(request_id)
        finally:
            self._refresh_stats()
            # A consumer that is still listening (shutdown without drain) gets a final output.
            output = _aborted_output(request_id, stream)
            self.metrics.observe([output])
            _deliver(stream.loop, [(stream.queue, output)])

    def _step(self) -> bool:
        try:
            outputs = self.engine.step()
        except Exception as err:  # noqa: BLE001
            self._fail_all(err)
            return False
        self.metrics.observe(outputs)
        self._refresh_stats()  # before delivery: a consumer that saw "finished" sees fresh stats
        by_loop: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted while this step ran
            stream.last = output
            if output.finished:
                del self._streams[output.request_id]
            by_loop[stream.loop].append((stream.queue, output))
        for loop, items in by_loop.items():
            _deliver(loop, items)
        return True

    def _fail_all(self, err: Exception) -> bool:
        """Fail every request in flight with EngineError; returns engine.has_unfinished()."""
        self.num_step_errors += 1
        self.metrics.errors.inc()
        log.error("lcjax.serve: engine step failed; failing %d request(s)", len(self._streams),
                  exc_info=err)
        failure = EngineError(f"the engine failed while serving this request: {err!r}")
        failed, self._streams = self._streams, {}
        for request_id in failed:
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001
                log.exception("lcjax.serve: abort of %s after an engine error failed", request_id)
        self._refresh_stats()
        for stream in failed.values():
            _deliver(stream.loop, [(stream.queue, failure)])
        try:
            return bool(self.engine.has_unfinished())
        except Exception:  # noqa: BLE001
            return False

    def _finish_all(self) -> None:
        """Thread exit: answer any add still queued and end every remaining stream."""
        self._stopping = True
        self._apply_commands()  # pending adds are refused, aborts applied
        for request_id in list(self._streams):
            try:
                self._abort(request_id)
            except Exception:  # noqa: BLE001
                log.exception("lcjax.serve: abort of %s at shutdown failed", request_id)
        self._refresh_stats()

    def _refresh_stats(self) -> None:
        try:
            self._stats = self.engine.stats()
        except Exception:  # noqa: BLE001
            log.exception("lcjax.serve: engine.stats() failed")


def _aborted_output(request_id: str, stream: _Stream) -> RequestOutput:
    last = stream.last
    return RequestOutput(
        request_id=request_id, prompt_token_ids=stream.prompt_token_ids,
        token_ids=list(last.token_ids) if last else [], new_token_ids=[],
        text=last.text if last else "", delta_text="", finished=True, finish_reason="abort",
        first_token_time=last.first_token_time if last else None,
        arrival_time=last.arrival_time if last else time.monotonic())


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, error: Optional[BaseException]) -> None:
    def set_it():
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    try:
        loop.call_soon_threadsafe(set_it)
    except RuntimeError:  # the caller's loop is closed: nobody is waiting
        pass


def _deliver(loop: asyncio.AbstractEventLoop, items: list) -> None:
    def put_all():
        for queue, item in items:
            queue.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:
        pass
