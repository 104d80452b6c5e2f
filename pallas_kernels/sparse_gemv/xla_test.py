"""xla (the dense reference) and xla_gather (active rows a block at a time in an XLA loop)
against the contract."""

from pallas_kernels.sparse_gemv import xla_gather
from pallas_kernels.sparse_gemv.contract import SparseGemvContract


class TestXla(SparseGemvContract):
    implementation = "xla"
    sparse = False


class TestXlaGather(SparseGemvContract):
    implementation = "xla_gather"
    marker = "while"  # the loop over blocks of active rows


class TestXlaGatherSmallBlocks(SparseGemvContract):
    implementation = "xla_gather"
    config = xla_gather.Config(block_k=16)
    marker = "while"
