"""pallas_gpu backend against the contract, in the Pallas interpreter (any platform)."""

from pallas_kernels.sparse_gemv import pallas_gpu
from pallas_kernels.sparse_gemv.contract import SparseGemvContract


class TestPallasGpuInterpret(SparseGemvContract):
    implementation = "pallas_gpu_interpret"
    marker = "pallas_call"
    config = pallas_gpu.Config(block_n=16, block_k=16, num_warps=4, num_stages=1)


class TestPallasGpuInterpretSplitK(SparseGemvContract):
    """Split-K: three spans of the active rows per column tile (uneven, some possibly empty)."""

    implementation = "pallas_gpu_interpret"
    marker = "pallas_call"
    config = pallas_gpu.Config(block_n=16, block_k=16, splits=3, num_warps=4, num_stages=1)


class TestPallasGpuInterpretMasked(SparseGemvContract):
    """Masked row loads in place (no compaction), split-K, and an XLA tail when K % 16 != 0."""

    implementation = "pallas_gpu_interpret"
    marker = "pallas_call"
    config = pallas_gpu.Config(block_n=16, block_k=16, splits=3, num_warps=4, num_stages=1,
                               mode="masked")
