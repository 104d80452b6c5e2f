"""The "triton" backend: the Triton kernel of triton_kernel.py launched through jax-triton.

Tiles come from the Pallas GPU `Config` and heuristic (same tiles, same constraints). The
"triton_interpret" registry entry runs the very same kernel in Triton's CPU interpreter through
`jax.pure_callback` with torch CPU tensors (needs TRITON_INTERPRET=1 before triton is first
imported; triton_test.py starts a child pytest that way). The hardware path needs jax-triton and
a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import triton as _triton  # noqa: F401  (ImportError here = backend unavailable, see api.py)

from pallas_kernels.quant_matmul import common, pallas_gpu, triton_kernel
from pallas_kernels.quant_matmul.pallas_gpu import Config, default_config, search_space
from pallas_kernels.quant_matmul.reference import Mode

try:
    import jax_triton
except ImportError:  # only the hardware path needs it
    jax_triton = None

__all__ = ["Config", "check", "default_config", "quant_gmm", "quant_matmul", "search_space"]

NAME = "triton"


def check(x, w, *, mode: Mode, out_dtype, grouped: bool, config=None, interpret=False) -> None:
    """Raise NotImplementedError for a case this backend cannot run (pallas_gpu's limits, plus
    jax-triton on the hardware path)."""
    pallas_gpu.check(x, w, mode=mode, out_dtype=out_dtype, grouped=grouped, config=config,
                     interpret=interpret, name=NAME)
    if not interpret and jax_triton is None:
        raise NotImplementedError(f"{NAME}: needs the jax-triton package (pip install "
                                  "'lcjax[gpu]'); implementation='triton_interpret' runs without")


def _to_torch(x: np.ndarray):
    """Host array -> torch CPU tensor; bf16 goes to float32 (numpy, hence Triton's interpreter,
    has no bf16: its bf16 dots would be wrong; hardware runs bf16 tensor-core dots)."""
    import torch

    if x.dtype == jnp.bfloat16:
        x = x.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x).copy())


def _launch(grid, args, out_shape, constants, *, config: Config, interpret: bool):
    if not interpret:
        return jax_triton.triton_call(*args, kernel=triton_kernel.quant_matmul_kernel,
                                      out_shape=out_shape, grid=grid, num_warps=config.num_warps,
                                      num_stages=config.num_stages, name="quant_matmul",
                                      **constants)
    from pallas_kernels.block_sparse_attention.triton_kernel import interpreted

    def host(*arrays):
        import torch

        dtype = np.dtype(out_shape.dtype)
        # NaN (or a sentinel) where no program stores: a missed output shows up.
        out = torch.from_numpy(np.full(out_shape.shape, np.nan if dtype.kind == "f" else -7,
                                       np.float32 if dtype == jnp.bfloat16 else dtype))
        interpreted(triton_kernel.quant_matmul_kernel)[grid](
            *(_to_torch(np.asarray(a)) for a in arrays), out, **constants)
        return out.numpy().astype(dtype)

    return jax.pure_callback(host, out_shape, *args)


def _run(x, w, w_scale, x_scale, tiles, *, mode, alpha, out_dtype, config, interpret):
    plan = common.k_plan(NAME, mode, x.shape[1], config.block_k, config.split_k)
    m, k = x.shape
    num_experts, _, n = w.shape
    grid, constants = triton_kernel.quant_matmul_launch(
        m=m, k=k, n=n, num_tiles=tiles.shape[1], num_experts=num_experts, bits=mode.bits,
        a8=mode.a8, group_size=mode.group_size, integer_scale=mode.integer_scale, alpha=alpha,
        sixteen=common.sixteen_times(mode), x_dtype_name=jnp.dtype(x.dtype).name,
        block_m=config.block_m, block_n=config.block_n, block_kp=plan.block_kp,
        num_blocks=plan.num_blocks, split_k=plan.split_k,
        blocks_per_group=plan.blocks_per_group)
    partial = plan.split_k > 1
    out_shape = (jax.ShapeDtypeStruct((plan.split_k, m, n), common.acc_dtype(mode)) if partial
                 else jax.ShapeDtypeStruct((m, n), out_dtype))
    # The kernel always takes an x_scale pointer; A16 passes a dummy it never reads.
    xs = x_scale if mode.a8 else jnp.zeros((1,), jnp.float32)
    out = _launch(grid, (tiles, x, w, w_scale, xs), out_shape, constants, config=config,
                  interpret=interpret)
    if not partial:
        return out
    return common.finish(out, x_scale, w_scale.reshape(-1, w_scale.shape[-1]), mode=mode,
                         alpha=alpha, out_dtype=out_dtype)


def quant_matmul(x, w, w_scale, x_scale, *, mode, alpha, out_dtype, config=None,
                 interpret=False):
    """See api.quant_matmul (arguments validated and normalised there)."""
    check(x, w, mode=mode, out_dtype=out_dtype, grouped=False, config=config,
          interpret=interpret)
    m, k = x.shape
    config = config or default_config(m, k, w.shape[1], mode)
    return _run(x, w[None], w_scale[None], x_scale, common.dense_row_tiles(m, config.block_m),
                mode=mode, alpha=alpha, out_dtype=out_dtype, config=config,
                interpret=interpret)


def quant_gmm(x, w, group_sizes, w_scale, x_scale, *, mode, alpha, out_dtype, config=None,
              interpret=False):
    """See api.quant_gmm (arguments validated and normalised there)."""
    check(x, w, mode=mode, out_dtype=out_dtype, grouped=True, config=config,
          interpret=interpret)
    m, k = x.shape
    config = config or default_config(m, k, w.shape[2], mode, num_experts=w.shape[0],
                                      grouped=True)
    tiles = common.grouped_row_tiles(group_sizes, m, config.block_m)
    return _run(x, w, w_scale, x_scale, tiles, mode=mode, alpha=alpha, out_dtype=out_dtype,
                config=config, interpret=interpret)
