"""Output directories that appear whole or not at all, with the modes the umask asks for.

A conversion writes into `.<name>.tmp-<host>-<pid>-<random>` beside the destination and renames
it into place on success. `tempfile.mkdtemp` creates that directory mode 0700 whatever the
umask, so it is chmod-ed to `0o777 & ~umask` (as `mkdir` would make it) before the rename.

A conversion killed mid-way (SIGKILL, OOM, power) cannot remove its temporary directory; the next
conversion into the same parent does: a directory whose name carries this host and a pid that is
no longer alive is stale. Directories from before the pid was in the name are stale once older
than `LEGACY_STALE_SECONDS`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import socket
import sys
import tempfile
import time
from typing import Callable, Iterator, Optional, Union

LEGACY_STALE_SECONDS = 24 * 3600
# mkdtemp appends 8 characters of [a-z0-9_]; the host may itself contain '-'.
_TAGGED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]{8}$")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]{8}$")


def current_umask() -> int:
    """The process umask, read without changing it (Linux); else set-and-restore."""
    with contextlib.suppress(OSError, ValueError):
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _is_stale(entry: pathlib.Path, now: float) -> bool:
    tagged = _TAGGED.match(entry.name)
    if tagged:
        if tagged["host"] != _host():  # another machine on a shared filesystem: its pids mean nothing here
            return False
        return int(tagged["pid"]) != os.getpid() and not _pid_alive(int(tagged["pid"]))
    legacy = _LEGACY.match(entry.name)
    return bool(legacy) and now - entry.stat().st_mtime > LEGACY_STALE_SECONDS


def remove_stale_temporaries(parent: pathlib.Path) -> list[str]:
    """Remove the temporary directories that dead conversions left in `parent`; their names.

    A stale `.old-` directory (the previous destination, moved aside during an overwrite) is kept
    when its destination is missing: it is then the only copy.
    """
    removed, now = [], time.time()
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(parent.iterdir()):
            match = _TAGGED.match(entry.name) or _LEGACY.match(entry.name)
            if not match or not entry.is_dir() or entry.is_symlink() or not _is_stale(entry, now):
                continue
            if match["kind"] == "old" and not (parent / match["name"]).exists():
                continue
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry.name)
    return removed


def _mkdtemp(dst: pathlib.Path, kind: str, mode: int) -> pathlib.Path:
    path = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.{kind}-{_host()}-{os.getpid()}-",
                                         dir=dst.parent))
    os.chmod(path, mode)
    return path


@contextlib.contextmanager
def atomic_directory(dst: Union[str, os.PathLike], overwrite: bool = False,
                     log: Optional[Callable[[str], None]] = None) -> Iterator[pathlib.Path]:
    """A fresh temporary directory beside `dst`, renamed to `dst` only if the block succeeds.

    Args:
      dst: the output directory; its parent is created if missing.
      overwrite: replace an existing `dst` (swapped in only after the block succeeded).
      log: called with one line when stale temporaries of dead conversions were removed
        (default: print to stderr).
    The directory gets mode `0o777 & ~umask`; files written into it get the umask's own modes.
    """
    dst = pathlib.Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(dst.parent)
    if removed:
        (log or _stderr)(f"removed {len(removed)} temporary folder(s) left by interrupted "
                         f"conversions in {dst.parent}: {', '.join(removed)}")
    mode = 0o777 & ~current_umask()
    tmp = _mkdtemp(dst, "tmp", mode)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():  # overwrite: swap, then drop the old copy
        old = _mkdtemp(dst, "old", 0o700)
        os.replace(dst, old / dst.name)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


__all__ = ["atomic_directory", "current_umask", "remove_stale_temporaries"]
