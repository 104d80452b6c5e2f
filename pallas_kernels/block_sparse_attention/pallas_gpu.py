"""The "pallas_gpu" backend: Pallas kernels lowered through Triton (forward and backward).

Validates the case, picks a `Config` and hands padded inputs to `pallas_gpu_kernel` (forward) and
`pallas_gpu_kernel_bwd` (dQ, dK/dV). `interpret=True` (the "pallas_gpu_interpret" registry entry)
runs the same kernels on CPU through Pallas' interpreter.

Cost: the grid visits only active (query block, key block) pairs of the layout's plan; with
explicit positions the plan is unknown on the host and every block is visited with the mask.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import pallas_gpu_kernel, pallas_gpu_kernel_bwd
from pallas_kernels.block_sparse_attention import sparsity
from pallas_kernels.block_sparse_attention.pallas_gpu_kernel import Config

__all__ = ["Config", "block_sparse_attention", "default_config", "search_space"]

NAME = "pallas_gpu"
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MIN_BLOCK = 16  # tl.dot's smallest tile edge on hardware


def default_config(q_shape, k_shape, v_shape, layout, *, interpret: bool = False) -> Config:
    """Heuristic: 128x64 forward and 64x64 backward tiles for head dims up to 128, halved past
    that (shared memory), shrunk for short sequences and to the layout's block-mask alignment."""
    s_len, t_len = q_shape[1], k_shape[1]
    d_max = max(sparsity.next_pow2(q_shape[3]), sparsity.next_pow2(v_shape[3]))
    wide = d_max > 128
    block_q, block_k = (64, 32) if wide else (128, 64)
    block_bwd = 32 if wide else 64
    cap_q, cap_k = sparsity.next_pow2(s_len), sparsity.next_pow2(t_len)
    aligned = sparsity.max_aligned_block(layout)
    if aligned is not None:
        cap_q, cap_k = min(cap_q, aligned), min(cap_k, aligned)
    floor = 1 if interpret else _MIN_BLOCK
    fit = lambda block, cap: max(floor, min(block, cap))
    return Config(block_q=fit(block_q, cap_q), block_k=fit(block_k, cap_k),
                  block_q_bwd=fit(block_bwd, cap_q), block_k_bwd=fit(block_bwd, cap_k),
                  num_warps=8 if d_max >= 128 else 4, num_warps_bwd=8 if d_max >= 128 else 4,
                  num_stages=3 if not wide else 2, interpret=interpret)


def search_space() -> list[Config]:
    """Configs the benchmark script sweeps."""
    return [Config(block_q=bq, block_k=bk, block_q_bwd=bb, block_k_bwd=bb, num_warps=w,
                   num_stages=st)
            for bq in (64, 128) for bk in (32, 64, 128) for bb in (32, 64)
            for w in (4, 8) for st in (2, 3)]


def block_sparse_attention(q, k, v, *, layout, q_positions=None, kv_positions=None,
                           q_segment_ids=None, kv_segment_ids=None, scale, return_lse=False,
                           config: Config | None = None, interpret: bool = False):
    """See `api.block_sparse_attention`; `config` overrides the heuristic."""
    if q.dtype not in _DTYPES:
        raise NotImplementedError(f"{NAME}: dtype={q.dtype} is not supported; supported: "
                                  f"{[jnp.dtype(d).name for d in _DTYPES]}")
    if not interpret and jax.default_backend() != "gpu":
        raise NotImplementedError(f"{NAME}: platform={jax.default_backend()!r} is not supported; "
                                  "supported: ('gpu',), or interpret=True on any platform")
    if config is None:
        config = default_config(q.shape, k.shape, v.shape, layout, interpret=interpret)
    elif interpret and not config.interpret:
        config = dataclasses.replace(config, interpret=True)
    problem = sparsity.plan(NAME, q, k, v, layout=layout, scale=scale, config=config,
                            q_positions=q_positions, kv_positions=kv_positions,
                            q_segment_ids=q_segment_ids, min_block=_MIN_BLOCK,
                            block_rule=f"powers of two >= {_MIN_BLOCK}")
    padded = sparsity.prepare(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                              s_pad=problem.s_pad, t_pad=problem.t_pad,
                              pad_head_dims_to_pow2=True)
    return sparsity.run(problem, functools.partial(pallas_gpu_kernel.forward, config=config),
                        functools.partial(pallas_gpu_kernel_bwd.backward, config=config),
                        *padded, return_lse=return_lse)
