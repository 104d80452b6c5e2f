"""Run untrusted Python in a child process with time, memory and process limits.

The child is a fresh `python -I -S` (isolated: no user site, no environment variables, no cwd on
sys.path) started in its own session inside a temporary directory that is removed afterwards.
Before the code runs, `resource.setrlimit` caps CPU seconds, address space, file size, open
files and process count (no fork bombs), and the socket modules are made unimportable (no
network; a best-effort guard, not a kernel namespace). A wall-clock timeout kills the child's
whole process group. Whatever happens, the caller gets a SandboxResult, never an exception.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile

_PRELUDE = """
import resource, sys
def _limit(what, value):
    try:
        resource.setrlimit(what, (value, value))
    except (ValueError, OSError):
        pass
_limit(resource.RLIMIT_CPU, {cpu})
_limit(resource.RLIMIT_AS, {memory})
_limit(resource.RLIMIT_FSIZE, 1 << 20)
_limit(resource.RLIMIT_NOFILE, 32)
_limit(resource.RLIMIT_NPROC, 0)
for _name in ("socket", "_socket", "ssl", "_ssl", "select", "urllib", "http"):
    sys.modules[_name] = None
del _limit, _name
with open("program.py") as _f:
    _src = _f.read()
exec(compile(_src, "program.py", "exec"), {{"__name__": "__main__"}})
"""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exit status 0 within the limits
    returncode: int  # negative: killed by that signal; -9 also for the wall-clock timeout
    timed_out: bool
    stdout: str
    stderr: str


def run_python(code: str, timeout: float = 5.0, cpu_seconds: int = 5,
               memory_bytes: int = 512 << 20) -> SandboxResult:
    """Run `code` as a program under the limits; see the module docstring."""
    if timeout <= 0 or cpu_seconds < 1 or memory_bytes < (16 << 20):
        raise ValueError(f"sandbox limits timeout={timeout}, cpu_seconds={cpu_seconds}, "
                         f"memory_bytes={memory_bytes}: expected > 0, >= 1, >= 16 MiB")
    with tempfile.TemporaryDirectory(prefix="lcjax-sandbox-") as work:
        with open(os.path.join(work, "program.py"), "w") as f:
            f.write(code)
        prelude = _PRELUDE.format(cpu=int(cpu_seconds), memory=int(memory_bytes))
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", prelude], cwd=work,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"},
                                    start_new_session=True)
        except OSError as err:
            return SandboxResult(False, -1, False, "", f"could not start: {err}")
        try:
            out, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            timed_out = True
        text = lambda b: b[-4096:].decode("utf-8", "replace")
        return SandboxResult(proc.returncode == 0 and not timed_out, proc.returncode, timed_out,
                             text(out), text(err))
