"""pallas_tpu backend against the contract in the Pallas interpreter, plus one case in TPU
interpret mode (pltpu.InterpretParams, which also simulates TPU memories; slower)."""

import jax
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul import api, gmm_contract, pallas_tpu
from pallas_kernels.grouped_matmul.gmm_contract import GmmContract


class TestPallasTpuInterpret(GmmContract):
    implementation = "pallas_tpu"
    config = pallas_tpu.Config(block_m=16, block_k=32, block_n=32, interpret=True)


def test_tpu_interpret_mode_forward_and_grads():
    case = gmm_contract.Case("small", (10, 0, 19), shape=(40, 16, 24))  # 11 tail rows
    lhs, rhs, group_sizes, d_out = gmm_contract.make_inputs(case)
    config = pallas_tpu.Config(block_m=16, block_k=16, block_n=16,
                               interpret=pltpu.InterpretParams())

    @jax.jit
    def forward_and_vjp(lhs, rhs, group_sizes, d_out):
        out, vjp = jax.vjp(lambda a, b: api.gmm(a, b, group_sizes, implementation="pallas_tpu",
                                                config=config), lhs, rhs)
        return out, *vjp(d_out)

    got = forward_and_vjp(lhs, rhs, group_sizes, d_out)
    tol = gmm_contract.TOLERANCES["float32"]
    for what, g, want in zip(("out", "d_lhs", "d_rhs"), got, gmm_contract.oracle(
            lhs, rhs, group_sizes, d_out)):
        gmm_contract.assert_close(g, want, tol["out" if what == "out" else "grad"], what)
    assert np.all(np.asarray(got[0])[29:] == 0)
