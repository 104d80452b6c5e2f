"""Runs tests/parallel/multidevice in a subprocess with 8 host CPU devices.

XLA fixes the CPU device count when the backend starts, and the rest of the suite runs on one
device, so the 8-device tests get their own interpreter. Their output is shown on failure.
"""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent


@pytest.mark.slow
def test_multidevice_suite():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(HERE / "multidevice")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500,
                         cwd=HERE.parent.parent)
    print(out.stdout[-6000:])
    assert out.returncode == 0, f"8-device tests failed:\n{out.stdout[-12000:]}\n{out.stderr[-4000:]}"
    assert " passed" in out.stdout, out.stdout[-2000:]
