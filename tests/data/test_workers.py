"""Grain worker processes die with the process that started them, even one killed with SIGKILL."""

import os
import pickle
import signal
import subprocess
import sys
import time

import psutil

CHILD = """
import pickle, sys
from lcjax.data import DataSpec, make_iterator
spec = DataSpec(source="text", path=sys.argv[1], seq_len=32, global_batch=4, heldout_fraction=0.25,
                num_workers=2)
it = make_iterator(spec, pickle.load(open(sys.argv[2], "rb")), host_index=0, host_count=1)
next(it)
print("ready", flush=True)
sys.stdin.read()  # until the test kills us
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped
    except psutil.NoSuchProcess:
        return True


def test_workers_exit_when_the_trainer_is_killed(corpus_glob, tokenizer, tmp_path):
    (tmp_path / "tok.pkl").write_bytes(pickle.dumps(tokenizer))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, corpus_glob, str(tmp_path / "tok.pkl")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        children = psutil.Process(proc.pid).children(recursive=True)
        workers = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
        assert len(workers) >= 2, [c.cmdline() for c in children]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(_gone(c.pid) for c in children):
            time.sleep(0.1)
        left = [(c.pid, c.cmdline()[-3:]) for c in children if not _gone(c.pid)]
        assert not left, f"outlived the killed parent: {left}"
    finally:
        proc.kill()
        for c in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            c.kill()
