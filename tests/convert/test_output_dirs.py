"""Conversion outputs: modes follow the umask; temporaries of killed conversions are cleaned up."""

import os
import stat
import subprocess
import sys

import pytest

from lcjax.convert import hf_to_lcjax, lcjax_to_hf
from lcjax.convert.atomic_dir import _host


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring the previous one after."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def _modes(root):
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_output_modes_follow_the_umask(hub_checkpoint, tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    hf_to_lcjax(hub_checkpoint[0], tmp_path / "lc")
    lcjax_to_hf(tmp_path / "lc", tmp_path / "hf")
    for root in (tmp_path / "lc", tmp_path / "hf"):
        modes = _modes(root)
        assert modes["."] == dir_mode, root
        for rel, mode in modes.items():
            want = dir_mode if (root / rel).is_dir() else file_mode
            assert mode & ~want == 0, f"{root / rel}: mode {oct(mode)}, umask allows {oct(want)}"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_conversions_are_removed(hub_checkpoint, tmp_path, capsys):
    host, dead = _host(), _dead_pid()
    stale = tmp_path / f".lc.tmp-{host}-{dead}-abcd1234"
    live = tmp_path / f".other.tmp-{host}-{os.getppid()}-efgh5678"  # the pytest parent lives on
    remote = tmp_path / f".lc.tmp-otherhost-{dead}-ijkl9012"  # another machine's pid: unknown here
    unrelated = tmp_path / "data.tmp-1-abcd1234"
    for path in (stale, live, remote, unrelated):
        (path / "variables").mkdir(parents=True)
        (path / "variables" / "x").write_bytes(b"partial")
    hf_to_lcjax(hub_checkpoint[0], tmp_path / "lc")
    assert not stale.exists()
    assert live.exists() and remote.exists() and unrelated.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "removed 1 temporary folder" in err[0] and stale.name in err[0]
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == sorted(
        [live.name, remote.name, unrelated.name])  # and the conversion's own temporary is gone


def test_killed_conversion_is_cleaned_up_by_the_next(hub_checkpoint, tmp_path):
    """SIGKILL a conversion mid-way: its temporary stays; the next conversion removes it."""
    code = ("import os, signal, sys\n"
            "import lcjax.convert.orbax_io as io\n"
            "def die(*a, **k): os.kill(os.getpid(), signal.SIGKILL)\n"
            "io.write_lcjax_checkpoint = die\n"
            "from lcjax.convert import hf_to_lcjax\n"
            "hf_to_lcjax(sys.argv[1], sys.argv[2])\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(hub_checkpoint[0]), str(tmp_path / "a")],
                            stderr=subprocess.PIPE, text=True)
    assert proc.wait(timeout=120) == -9, proc.stderr.read()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".a.tmp-{_host()}-{proc.pid}-"), left
    hf_to_lcjax(hub_checkpoint[0], tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
