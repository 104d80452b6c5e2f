"""pallas_gpu backend against the contract, in the Pallas interpreter (any platform); split-K."""

import pytest

from pallas_kernels.quant_matmul import contract, pallas_gpu
from pallas_kernels.quant_matmul.contract import QuantMatmulContract

BLOCKS = dict(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)


class TestPallasGpuInterpret(QuantMatmulContract):
    implementation = "pallas_gpu_interpret"
    marker = "pallas_call"
    config = pallas_gpu.Config(**BLOCKS)


@pytest.mark.parametrize("name", ["w4a8_odyssey_exact", "w4a8_int_g32_exact",
                                  "w4a8_float_g32", "w4a16_g32"])
def test_split_k_sums_partial_accumulators(name):
    """split_k=2: each split stores its accumulator; XLA sums them and applies the epilogue."""
    case = contract.case_named(name)
    got = contract.run("pallas_gpu_interpret", case, pallas_gpu.Config(**BLOCKS, split_k=2))
    _, oracle_in = contract.make_inputs(case)
    contract.assert_matches(case, got, contract.oracle(case, oracle_in))
