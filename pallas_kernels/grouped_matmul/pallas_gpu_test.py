"""pallas_gpu backend against the contract, in the Pallas interpreter (any platform)."""

from pallas_kernels.grouped_matmul import pallas_gpu
from pallas_kernels.grouped_matmul.gmm_contract import GmmContract


class TestPallasGpuInterpret(GmmContract):
    implementation = "pallas_gpu"
    config = pallas_gpu.Config(block_m=16, block_n=32, block_k=32, interpret=True)
