"""Run the API with uvicorn in-process: in the main thread (the CLI) or a background thread (tests).

The listening socket is bound before uvicorn starts, so port 0 works and `url` is known at
once. `run()` (main thread) owns SIGINT/SIGTERM: the first stops accepting connections and lets
running requests finish for up to `drain_timeout` seconds (then cancels them, which aborts their
engine requests), then stops the engine thread and returns 0; a second SIGINT skips the wait.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from typing import Callable, Optional

import uvicorn

from lcjax.serve.async_engine import AsyncEngine

PREFIX = "lcjax.serve:"


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server that reports readiness and leaves signal handling to `Server.run`."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]):
        super().__init__(config)
        self._on_ready = on_ready

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own handler re-raises the signal after shutdown (exit status 130 / -15);
        # a drained Ctrl-C should exit 0.
        yield

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_ready()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0 = a free port); OSError if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Server:
    """One HTTP server for `app`, bound to host:port (0 = a free port) at construction.

    Args:
      app: the ASGI app (see `lcjax.serve.api.build_app`).
      async_engine: stopped after uvicorn exits (None: the caller stops it).
      drain_timeout: seconds running requests get to finish on shutdown.
      log_level: uvicorn's ("warning" keeps tests quiet; "info" logs each request).
      announce: print the URL and the ready line when connections are accepted.
      sock: an already bound listening socket (see `bind`) instead of host:port.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *,
                 async_engine: Optional[AsyncEngine] = None, model_name: str = "model",
                 drain_timeout: float = 30.0, log_level: str = "warning", announce: bool = False,
                 sock: Optional[socket.socket] = None):
        self.host, self.async_engine, self.model_name = host, async_engine, model_name
        self.announce = announce
        self.socket = sock if sock is not None else bind(host, port)
        self.port = self.socket.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, lifespan="off",
                                timeout_graceful_shutdown=drain_timeout,
                                access_log=log_level in ("debug", "trace", "info"))
        self.ready = threading.Event()
        self._uvicorn = _Uvicorn(config, self._on_ready)
        self._thread: Optional[threading.Thread] = None

    def _on_ready(self) -> None:
        if self.announce:
            print(f"{PREFIX} serving {self.model_name} at {self.url}/v1", flush=True)
            print(f"{PREFIX} ready", flush=True)
        self.ready.set()

    # ------------------------------------------------------------ background thread (tests)

    def start(self, timeout: float = 30.0) -> "Server":
        """Serve from a daemon thread; returns once connections are accepted."""
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.socket]},
                                        name="lcjax-http", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout):
            raise RuntimeError(f"server at {self.url} did not start within {timeout} s")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, drain (up to drain_timeout), stop the engine; idempotent."""
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._stop_engine()

    def _stop_engine(self) -> None:
        if self.async_engine is not None:
            self.async_engine.shutdown(drain=False)

    # ------------------------------------------------------------ main thread (CLI)

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM; drain; return 0."""
        def handle(signum, _frame):
            if self._uvicorn.should_exit:
                self._uvicorn.force_exit = True
                return
            print(f"{PREFIX} {signal.Signals(signum).name}: draining running requests "
                  "(Ctrl-C again to stop now)", file=sys.stderr, flush=True)
            self._uvicorn.should_exit = True

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_engine()
        print(f"{PREFIX} stopped", flush=True)
        return 0
