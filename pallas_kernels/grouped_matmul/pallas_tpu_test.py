"""pallas_tpu backend against the contract, in Pallas interpret mode (any platform)."""

from pallas_kernels.grouped_matmul import pallas_tpu
from pallas_kernels.grouped_matmul.gmm_contract import GmmContract


class TestPallasTpuInterpret(GmmContract):
    implementation = "pallas_tpu"
    config = pallas_tpu.Config(block_m=16, block_k=32, block_n=32, interpret=True)
