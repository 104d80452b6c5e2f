"""The "xla" backend (ragged_dot through the shared custom VJP) against the contract."""

from pallas_kernels.grouped_matmul.gmm_contract import GmmContract


class TestXla(GmmContract):
    implementation = "xla"
