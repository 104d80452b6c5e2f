"""The "triton" backend on CPU: the contract through Triton's interpreter (jax.pure_callback).

Triton decides at import whether kernels are interpreted (TRITON_INTERPRET=1), so the contract
and `triton_kernel_test.py` run in a child pytest with that variable set
(pallas_kernels/triton_interpreter_test.py, one child for every op); in this process they are
skipped.
"""

import os

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

from pallas_kernels.block_sparse_attention import api, masks, triton as triton_backend  # noqa: E402
from pallas_kernels.block_sparse_attention.contract import AttentionContract  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child")
class TestTritonInterpret(AttentionContract):
    implementation = "triton_interpret"
    visits_only_active_blocks = True
    unsupported_cases = {"composed": "OrLayout.*not supported"}


def test_registered_under_both_names():
    assert {"triton", "triton_interpret"} <= set(api.available_implementations())


def test_layout_constants_and_refusals():
    assert triton_backend.layout_constants(masks.LozaLayout() & masks.SlidingWindowLayout(9)) == dict(
        CAUSAL=True, WINDOW=9, LOZA_BLOCK=128, LOZA_SINK=1, LOZA_LOCAL=7)
    assert triton_backend.layout_constants(masks.FullLayout())["CAUSAL"] is False
    with pytest.raises(NotImplementedError, match="OrLayout"):
        triton_backend.layout_constants(masks.CausalLayout() | masks.SlidingWindowLayout(3))
