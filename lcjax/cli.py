"""How the command-line entrypoints report failures: one line on stderr, a conventional exit code.

`prog: error: <message>` and exit 2 for what the user can fix (bad config or input, files,
a diverged run), exit 1 with the exception's type for anything else; `--traceback` or
LCJAX_TRACEBACK=1 re-raises instead, so the full stack shows. Ctrl-C outside the training
loop's own handling prints `prog: interrupted` and exits 130.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

TRACEBACK_ENV = "LCJAX_TRACEBACK"
USAGE_ERROR = 2  # argparse's code for bad arguments; used for every error the user can fix


def wants_traceback(flag: bool = False) -> bool:
    return flag or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The exception's message on one line (OSError: reason and file, not errno tuples)."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror + (f": {err.filename}" if err.filename else "")
    else:
        text = str(err) or type(err).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def run_main(prog: str, body: Callable[[], int], traceback: bool = False,
             user_errors: tuple = (ValueError, OSError), context: Callable[[BaseException], str] = None
             ) -> int:
    """body() -> exit code, with its exceptions turned into one stderr line and a code.

    `context(err)` may prefix a message (e.g. the run directory for file-system errors).
    """
    try:
        return body()
    except KeyboardInterrupt:
        if wants_traceback(traceback):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001: the point is to catch everything once, here
        if wants_traceback(traceback):
            raise
        prefix = context(err) if context else ""
        if isinstance(err, user_errors):
            print(f"{prog}: error: {prefix}{one_line(err)}", file=sys.stderr)
            return USAGE_ERROR
        print(f"{prog}: error: {type(err).__name__}: {prefix}{one_line(err)} "
              f"({TRACEBACK_ENV}=1 shows the stack)", file=sys.stderr)
        return 1
