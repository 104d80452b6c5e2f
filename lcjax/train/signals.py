"""SIGINT / SIGTERM during training: the first asks the loop to stop cleanly, the second exits now.

A preempted job gets SIGTERM and a grace period; Ctrl-C sends SIGINT. Raising an exception at an
arbitrary bytecode (Python's default for SIGINT) can land between reading a batch and the step
that consumes it, or inside XLA's compiler; so the handler only records the signal and the loop
stops at its next step boundary, where state, optimizer and data iterator agree, and saves. A
second signal exits at once with `os._exit`: checkpoints are written to a temporary directory
and renamed when complete, so the newest complete checkpoint is never damaged.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell convention for a process ended by `signum`: 128 + signum (130 / 143)."""
    return 128 + signum


def _say(text: str) -> None:
    # os.write, not print: a handler may run while the main thread is inside a print to stderr.
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class StopRequest:
    """Context manager that turns SIGINT / SIGTERM into a stop request for the training loop.

    Handlers are installed only in the main thread (Python delivers signals there); elsewhere
    the context is inert and the default behaviour stays.
    """

    def __init__(self, prog: str = "lcjax.train"):
        self.prog = prog
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> Optional[str]:
        return None if self.signum is None else signal.Signals(self.signum).name

    def _handle(self, signum, frame) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.signum is not None:
            _say(f"{self.prog}: second {name}: exiting now; the newest complete checkpoint is kept\n")
            os._exit(exit_code(signum))
        self.signum = signum
        _say(f"{self.prog}: {name} received: stopping after the current step and saving a "
             f"checkpoint (send it again to exit at once)\n")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
