"""The "pallas_tpu" backend: Mosaic TPU kernels driven by a scalar-prefetched block plan.

Validates the case, picks a `Config`, moves arrays to head-major order for the kernels in
`pallas_tpu_kernel` and back. `interpret=True` (the "pallas_tpu_interpret" registry entry) runs
the same kernels in Pallas' TPU interpreter on CPU.

Cost: grid steps per query block = the plan's widest row; steps past a row's count neither DMA
nor compute, so work and traffic scale with the layout's density.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import pallas_tpu_kernel, sparsity
from pallas_kernels.block_sparse_attention.pallas_tpu_kernel import Config

__all__ = ["Config", "block_sparse_attention", "default_config", "search_space"]

NAME = "pallas_tpu"
_DTYPES = (jnp.float32, jnp.bfloat16)
_LANES = 128  # hardware blocks: multiples of the lane width


def default_config(q_shape, k_shape, layout, *, interpret: bool = False) -> Config:
    """512-row forward and 256-row backward tiles, shrunk to the sequence and to the layout's
    block-mask alignment; never below 128 on hardware. Interpret mode uses 128/64 tiles so short
    test sequences still exercise multi-block plans."""
    cap_q, cap_k = sparsity.next_pow2(q_shape[1]), sparsity.next_pow2(k_shape[1])
    aligned = sparsity.max_aligned_block(layout)
    if aligned is not None:
        cap_q, cap_k = min(cap_q, aligned), min(cap_k, aligned)
    floor = 1 if interpret else _LANES
    fit = lambda block, cap: max(floor, min(block, cap))
    fwd, bwd = (128, 64) if interpret else (512, 256)
    return Config(block_q=fit(fwd, cap_q), block_k=fit(fwd, cap_k), block_q_bwd=fit(bwd, cap_q),
                  block_k_bwd=fit(bwd, cap_k), interpret=interpret)


def search_space() -> list[Config]:
    return [Config(block_q=bq, block_k=bk, block_q_bwd=bb, block_k_bwd=bb)
            for bq in (128, 256, 512) for bk in (128, 256, 512) for bb in (128, 256, 512)]


def _to_heads(x):
    return jnp.swapaxes(x, 1, 2)  # [B, S, H, D] <-> [B, H, S, D]


def _forward(problem, q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, config):
    out, lse = pallas_tpu_kernel.forward(problem, _to_heads(q), _to_heads(k), _to_heads(v),
                                         q_pos, kv_pos, q_seg, kv_seg, config=config)
    return _to_heads(out), lse[..., 0]


def _backward(problem, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, d_out, delta, *,
              config):
    dq, dk, dv = pallas_tpu_kernel.backward(
        problem, _to_heads(q), _to_heads(k), _to_heads(v), q_pos, kv_pos, q_seg, kv_seg, None,
        lse[..., None], _to_heads(d_out), delta[..., None], config=config)
    return _to_heads(dq), _to_heads(dk), _to_heads(dv)


def block_sparse_attention(q, k, v, *, layout, q_positions=None, kv_positions=None,
                           q_segment_ids=None, kv_segment_ids=None, scale, return_lse=False,
                           config: Config | None = None, interpret: bool = False):
    """See `api.block_sparse_attention`; `config` overrides the heuristic."""
    if q.dtype not in _DTYPES:
        raise NotImplementedError(f"{NAME}: dtype={q.dtype} is not supported; supported: "
                                  f"{[jnp.dtype(d).name for d in _DTYPES]}")
    if not interpret and jax.default_backend() != "tpu":
        raise NotImplementedError(f"{NAME}: platform={jax.default_backend()!r} is not supported; "
                                  "supported: ('tpu',), or interpret=True on any platform")
    if config is None:
        config = default_config(q.shape, k.shape, layout, interpret=interpret)
    elif interpret and not config.interpret:
        config = dataclasses.replace(config, interpret=True)
    problem = sparsity.plan(NAME, q, k, v, layout=layout, scale=scale, config=config,
                            q_positions=q_positions, kv_positions=kv_positions,
                            q_segment_ids=q_segment_ids, min_block=_LANES,
                            block_rule=f"multiples of {_LANES}")
    padded = sparsity.prepare(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                              s_pad=problem.s_pad, t_pad=problem.t_pad,
                              pad_head_dims_to_pow2=False)
    return sparsity.run(problem, functools.partial(_forward, config=config),
                        functools.partial(_backward, config=config), *padded,
                        return_lse=return_lse)
