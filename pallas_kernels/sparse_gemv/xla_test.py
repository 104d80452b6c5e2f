"""xla (the dense reference) and xla_gather (gather the active rows, then a matmul) against
the contract."""

from pallas_kernels.sparse_gemv import xla_gather
from pallas_kernels.sparse_gemv.contract import SparseGemvContract


class TestXla(SparseGemvContract):
    implementation = "xla"
    sparse = False


class TestXlaGather(SparseGemvContract):
    implementation = "xla_gather"
    marker = "cond"  # the capacity bucket chosen at run time


class TestXlaGatherTwoBuckets(SparseGemvContract):
    implementation = "xla_gather"
    config = xla_gather.Config(buckets=2)
    marker = "cond"
