"""The Triton backends' tests that need TRITON_INTERPRET=1, all in one child pytest.

Triton decides at import whether kernels are interpreted, so these tests run in a child process
started with the variable set; in this process they are skipped. One child for every op pays
the cold start (jax, torch, triton imports) once. The grouped-matmul Triton test drives its
own child (it exchanges results through an .npz file).
"""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

_HERE = pathlib.Path(__file__).resolve().parent
CHILD_TESTS = ("block_sparse_attention/triton_test.py::TestTritonInterpret",
               "block_sparse_attention/triton_kernel_test.py",
               "quant_matmul/triton_test.py")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the child")
def test_triton_backends_under_the_interpreter(request):
    markexpr = request.config.getoption("markexpr") or ""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            *(str(_HERE / t) for t in CHILD_TESTS)]
    if markexpr:
        args += ["-m", markexpr]
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.run(args, env=env, cwd=_HERE.parent, capture_output=True, text=True,
                           timeout=1800)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    assert " passed" in child.stdout and " failed" not in child.stdout, child.stdout[-2000:]
