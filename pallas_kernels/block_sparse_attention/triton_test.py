"""The "triton" backend on CPU: the contract through Triton's interpreter (jax.pure_callback).

Triton decides at import whether kernels are interpreted (TRITON_INTERPRET=1), so the contract
and `triton_kernel_test.py` run in a child pytest with that variable set; in this process they
are skipped and `test_under_the_triton_interpreter` reports the child's result.
"""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

from pallas_kernels.block_sparse_attention import api, masks, triton as triton_backend  # noqa: E402
from pallas_kernels.block_sparse_attention.contract import AttentionContract  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_HERE = pathlib.Path(__file__).resolve()


@pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child")
class TestTritonInterpret(AttentionContract):
    implementation = "triton_interpret"
    visits_only_active_blocks = True
    unsupported_cases = {"composed": "OrLayout.*not supported"}


@pytest.mark.skipif(INTERPRETING, reason="this is the child")
def test_under_the_triton_interpreter(request):
    markexpr = request.config.getoption("markexpr") or ""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"{_HERE}::TestTritonInterpret", str(_HERE.with_name("triton_kernel_test.py"))]
    if markexpr:
        args += ["-m", markexpr]
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.run(args, env=env, cwd=_HERE.parents[2], capture_output=True, text=True,
                           timeout=1200)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    assert " passed" in child.stdout and " failed" not in child.stdout, child.stdout[-2000:]


def test_registered_under_both_names():
    assert {"triton", "triton_interpret"} <= set(api.available_implementations())


def test_layout_constants_and_refusals():
    assert triton_backend.layout_constants(masks.LozaLayout() & masks.SlidingWindowLayout(9)) == dict(
        CAUSAL=True, WINDOW=9, LOZA_BLOCK=128, LOZA_SINK=1, LOZA_LOCAL=7)
    assert triton_backend.layout_constants(masks.FullLayout())["CAUSAL"] is False
    with pytest.raises(NotImplementedError, match="OrLayout"):
        triton_backend.layout_constants(masks.CausalLayout() | masks.SlidingWindowLayout(3))
