"""The "xla" backend (the reference) against the contract's integer / float64 oracle."""

from pallas_kernels.quant_matmul.contract import QuantMatmulContract


class TestXla(QuantMatmulContract):
    implementation = "xla"
