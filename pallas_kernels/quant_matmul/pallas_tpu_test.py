"""pallas_tpu backend against the contract in TPU interpret mode (pltpu.InterpretParams, any
platform): 64-wide k steps (two groups of 32; a partial last step at K=96), and 128-wide ones."""

import pytest

from pallas_kernels.quant_matmul import contract, pallas_tpu
from pallas_kernels.quant_matmul.contract import QuantMatmulContract


class TestPallasTpuInterpret(QuantMatmulContract):
    implementation = "pallas_tpu_interpret"
    marker = "pallas_call"
    config = pallas_tpu.Config(block_m=8, block_k=64, block_n=32)
    unsupported = {"w8a16_f16": r"x.dtype=float16 is not supported; supported: \('int8', "}


@pytest.mark.parametrize("name", ["w4a8_int_g32_exact", "w4a8_float_g32", "w8a8_bf16_out"])
def test_wide_steps(name):
    """block_k=128: four groups of 32 per step; K=96 clamps to one full-dimension step."""
    case = contract.case_named(name)
    got = contract.run("pallas_tpu_interpret", case, pallas_tpu.Config(block_m=16, block_k=128,
                                                                       block_n=128))
    _, oracle_in = contract.make_inputs(case)
    contract.assert_matches(case, got, contract.oracle(case, oracle_in))
