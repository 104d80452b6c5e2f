"""megablox backend (jax's TPU grouped matmul) against the contract in the Pallas interpreter:
small tiles so T <= 256 spans many row tiles, partial k / n tiles and row counts that the row
tile does not divide (the wrapper pads them)."""

from pallas_kernels.grouped_matmul import megablox
from pallas_kernels.grouped_matmul.gmm_contract import GmmContract


class TestMegabloxInterpret(GmmContract):
    implementation = "megablox"
    config = megablox.Config(block_m=16, block_k=32, block_n=32, interpret=True)
