"""The "triton" backend on CPU: the contract through Triton's interpreter (jax.pure_callback), and
the kernel compiled for an H100 (sm_90) down to a cubin, which needs no GPU.

Triton decides at import whether kernels are interpreted (TRITON_INTERPRET=1), so the contract
runs in a child pytest with that variable set (pallas_kernels/triton_interpreter_test.py, one
child for every op); in this process it is skipped.
"""

import os
import re

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

from pallas_kernels.quant_matmul import (  # noqa: E402
    api, common, pallas_gpu, triton_kernel)
from pallas_kernels.quant_matmul.contract import QuantMatmulContract  # noqa: E402
from pallas_kernels.quant_matmul.reference import Mode  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child")
class TestTritonInterpret(QuantMatmulContract):
    implementation = "triton_interpret"
    marker = "pure_callback"
    config = pallas_gpu.Config(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)


@pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child")
@pytest.mark.parametrize("name", ["w4a8_int_g32_exact", "w4a8_float_g32", "w4a16_g32"])
def test_split_k(name):
    from pallas_kernels.quant_matmul import contract

    case = contract.case_named(name)
    config = pallas_gpu.Config(block_m=16, block_n=32, block_k=32, split_k=2, num_warps=4,
                               num_stages=1)
    _, oracle_in = contract.make_inputs(case)
    contract.assert_matches(case, contract.run("triton_interpret", case, config),
                            contract.oracle(case, oracle_in))


def test_registered_under_both_names():
    assert {"triton", "triton_interpret"} <= set(api.available_implementations())


# (mode, M, K, N, x dtype, MMA instruction expected in the PTX): the shapes, default tiles
_SM90 = [
    (Mode(8, True, None, False), 8192, 8192, 8192, "i8", r"wgmma\.mma_async\S*\.s32\.s8\.s8"),
    (Mode(4, True, 128, True), 16, 8192, 28672, "i8", r"mma\.\S*\.s32\.s8\.s8"),
    (Mode(4, True, 128, False), 1, 8192, 28672, "i8", r"mma\.\S*\.s32\.s8\.s8"),
    (Mode(4, True, None, False), 16, 8192, 28672, "i8", r"mma\.\S*\.s32\.s8\.s8"),
    (Mode(4, False, 128, False), 16, 8192, 28672, "bf16", r"mma\.\S*\.bf16"),
    (Mode(4, True, 128, True), 16, 8192, 8192, "i8", r"mma\.\S*\.s32\.s8\.s8"),  # split_k=2
]


@pytest.mark.skipif(INTERPRETING, reason="compiles the real kernel")
@pytest.mark.parametrize("mode, m, k, n, x_type, mma", _SM90, ids=[
    "w8a8_8192", "w4a8_int_decode", "w4a8_float_m1", "w4a8_odyssey_decode", "w4a16_decode",
    "w4a8_int_split_k"])
def test_compiles_for_h100(mode, m, k, n, x_type, mma):
    """TTIR -> TTGIR -> LLVM -> PTX -> cubin for sm_90 with the heuristic config: catches what
    the interpreter accepts but the compiler does not (dot dtypes, shapes, shared memory), and
    checks the products run on int8 / bf16 tensor cores."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton import compile as triton_compile

    config = pallas_gpu.default_config(m, k, n, mode)
    assert (config.split_k > 1) == (n == 8192 and m == 16)
    plan = common.k_plan("triton", mode, k, config.block_k, config.split_k)
    _, constants = triton_kernel.quant_matmul_launch(
        m=m, k=k, n=n, num_tiles=-(-m // config.block_m), num_experts=1, bits=mode.bits,
        a8=mode.a8, group_size=mode.group_size, integer_scale=mode.integer_scale, alpha=1024,
        sixteen=common.sixteen_times(mode), x_dtype_name=x_type, block_m=config.block_m,
        block_n=config.block_n, block_kp=plan.block_kp, num_blocks=plan.num_blocks,
        split_k=plan.split_k, blocks_per_group=plan.blocks_per_group)
    out = ("*i32" if mode.a8 and mode.group_size is None or mode.integer_scale else "*fp32") \
        if plan.split_k > 1 else "*bf16"
    signature = dict(tiles_ptr="*i32", x_ptr=f"*{x_type}", w_ptr="*i8",
                     ws_ptr="*i32" if mode.integer_scale else "*fp32", xs_ptr="*fp32",
                     out_ptr=out, **{name: "constexpr" for name in constants})
    compiled = triton_compile(ASTSource(triton_kernel.quant_matmul_kernel, signature,
                                        constexprs=constants),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=config.num_warps,
                                           num_stages=config.num_stages))
    assert compiled.asm["cubin"]
    assert re.search(mma, compiled.asm["ptx"]), sorted(set(re.findall(r"\bw?gmma\S*|\bmma\S*",
                                                                      compiled.asm["ptx"])))
