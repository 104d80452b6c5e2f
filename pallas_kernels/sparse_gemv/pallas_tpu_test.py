"""pallas_tpu backend against the contract in TPU interpret mode (pltpu.InterpretParams)."""

from pallas_kernels.sparse_gemv import pallas_tpu
from pallas_kernels.sparse_gemv.contract import SparseGemvContract


class TestPallasTpuInterpret(SparseGemvContract):
    implementation = "pallas_tpu_interpret"
    marker = "pallas_call"
    config = pallas_tpu.Config(block_n=32)  # two column tiles at N=64, one at N=32
