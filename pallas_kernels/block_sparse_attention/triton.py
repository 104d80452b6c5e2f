"""The "triton" backend: the Triton kernels of `triton_kernel` launched through jax-triton.

Validates the case, turns the layout into kernel constants, picks tiles (the Pallas GPU `Config`
and heuristic: same tiles, same constraints) and launches forward, dQ and dK/dV kernels over the
host block plan. `interpret=True` (the "triton_interpret" registry entry) runs the very same
kernels in Triton's CPU interpreter through `jax.pure_callback` with torch CPU tensors, so CPU CI
covers the wrapper, the plan and the kernels; the hardware path needs jax-triton and a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import triton as _triton  # noqa: F401  (ImportError here = backend unavailable, see api.py)

from pallas_kernels.block_sparse_attention import masks, sparsity, triton_kernel
from pallas_kernels.block_sparse_attention.pallas_gpu import default_config
from pallas_kernels.block_sparse_attention.pallas_gpu_kernel import Config

try:
    import jax_triton
except ImportError:  # only the hardware path needs it
    jax_triton = None

__all__ = ["Config", "block_sparse_attention", "layout_constants"]

NAME = "triton"
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MIN_BLOCK = 16


def layout_constants(layout: masks.Layout) -> dict:
    """CAUSAL / WINDOW / LOZA_* constexprs for an And of Full, Causal, SlidingWindow, at most one
    Loza (and aligned BlockMask, see `sparsity.check_layout`); NotImplementedError otherwise."""
    kernel_layout = sparsity._kernel_layout(layout)
    members = (kernel_layout.layouts if isinstance(kernel_layout, masks.AndLayout)
               else (kernel_layout,))
    constants = dict(CAUSAL=False, WINDOW=0, LOZA_BLOCK=0, LOZA_SINK=0, LOZA_LOCAL=0)
    for m in members:
        if isinstance(m, masks.FullLayout):
            continue
        if isinstance(m, masks.CausalLayout):
            constants["CAUSAL"] = True
        elif isinstance(m, masks.SlidingWindowLayout):
            constants["CAUSAL"] = True
            window = constants["WINDOW"]
            constants["WINDOW"] = m.window if window == 0 else min(window, m.window)
        elif isinstance(m, masks.LozaLayout) and constants["LOZA_BLOCK"] == 0:
            constants.update(CAUSAL=True, LOZA_BLOCK=m.block_size, LOZA_SINK=m.sink_blocks,
                             LOZA_LOCAL=m.local_blocks)
        else:
            raise NotImplementedError(
                f"{NAME}: layout={layout!r} is not supported (member {m!r}); supported: Full, "
                "Causal, SlidingWindow, one Loza, aligned BlockMask, and & of those")
    return constants


def _to_torch(x: np.ndarray):
    """Host array -> torch CPU tensor; bf16 goes to float32 (see `_launch`)."""
    import torch

    if x.dtype == jnp.bfloat16:
        x = x.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x).copy())


def _torch_dtype(dtype):
    import torch

    return {np.dtype(jnp.float32): torch.float32, np.dtype(jnp.bfloat16): torch.float32,
            np.dtype(jnp.float16): torch.float16, np.dtype(jnp.int32): torch.int32}[np.dtype(dtype)]


def _launch(kernel, grid, args, out_shapes, constants, *, config: Config, backward: bool):
    """Run `kernel` on `args` (then outputs) with `constants`; returns the outputs."""
    num_warps = config.num_warps_bwd if backward else config.num_warps
    num_stages = config.num_stages_bwd if backward else config.num_stages
    if not config.interpret:
        return jax_triton.triton_call(*args, kernel=kernel, out_shape=out_shapes, grid=grid,
                                      num_warps=num_warps, num_stages=num_stages, **constants)

    # Triton's interpreter runs numpy, which has no bf16: its bf16 dots are wrong, so bf16
    # operands are widened to float32 there (hardware runs bf16 tensor-core dots).
    def host(*arrays):
        import torch

        outs = [torch.empty(s.shape, dtype=_torch_dtype(s.dtype)) for s in out_shapes]
        triton_kernel.interpreted(kernel)[grid](*(_to_torch(np.asarray(a)) for a in arrays),
                                                *outs, **constants)
        return tuple(o.numpy().astype(s.dtype) for o, s in zip(outs, out_shapes))

    return list(jax.pure_callback(host, tuple(out_shapes), *args))


def _common(problem: sparsity.Problem, q, k, v, plan_lists, *, backward: bool):
    batch, s_len, num_heads, d_k = q.shape
    t_len, num_groups, d_v = k.shape[1], k.shape[2], v.shape[3]
    packed = plan_lists.packed()
    constants = dict(S=s_len, T=t_len, H=num_heads, G=num_groups, DK=d_k, DV=d_v,
                     BLOCK_Q=problem.block_q_bwd if backward else problem.block_q,
                     BLOCK_K=problem.block_k_bwd if backward else problem.block_k,
                     PLAN_W=packed.shape[1], QK_SCALE=problem.scale * sparsity.LOG2_E,
                     HAS_SEG=problem.has_segments,
                     DOT_PRECISION="ieee" if q.dtype == jnp.float32 else "tf32",
                     **layout_constants(problem.layout))
    return jnp.asarray(packed), constants


def _segments(q_pos, kv_pos, q_seg, kv_seg):
    # Kernels take segment pointers either way; without segments they are never read.
    return (q_pos, kv_pos) if q_seg is None else (q_seg, kv_seg)


def forward(problem, q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, config: Config):
    batch, s_len, num_heads, _ = q.shape
    plan = problem.plan
    packed, constants = _common(problem, q, k, v, plan.by_q, backward=False)
    out_shapes = [jax.ShapeDtypeStruct((batch, s_len, num_heads, v.shape[3]), q.dtype),
                  jax.ShapeDtypeStruct((batch, num_heads, s_len), jnp.float32)]
    return _launch(triton_kernel.attention_fwd, (plan.num_q_blocks, batch * num_heads),
                   (q, k, v, q_pos, kv_pos, *_segments(q_pos, kv_pos, q_seg, kv_seg), packed),
                   out_shapes, constants, config=config, backward=False)


def backward(problem, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, d_out, delta, *,
             config: Config):
    del out  # enters through delta
    batch, _, num_heads, _ = q.shape
    num_groups = k.shape[2]
    plan = problem.plan_bwd
    d_out = d_out.astype(q.dtype)
    sides = (q_pos, kv_pos, *_segments(q_pos, kv_pos, q_seg, kv_seg))
    packed, constants = _common(problem, q, k, v, plan.by_q, backward=True)
    constants["SCALE"] = problem.scale
    (dq,) = _launch(triton_kernel.attention_dq, (plan.num_q_blocks, batch * num_heads),
                    (q, k, v, *sides, d_out, lse, delta, packed),
                    [jax.ShapeDtypeStruct(q.shape, q.dtype)], constants, config=config,
                    backward=True)
    packed, constants = _common(problem, q, k, v, plan.by_kv, backward=True)
    constants["SCALE"] = problem.scale
    dk, dv = _launch(triton_kernel.attention_dkv, (plan.num_kv_blocks, batch * num_groups),
                     (q, k, v, *sides, d_out, lse, delta, packed),
                     [jax.ShapeDtypeStruct(k.shape, k.dtype),
                      jax.ShapeDtypeStruct(v.shape, v.dtype)], constants, config=config,
                     backward=True)
    return dq, dk, dv


def block_sparse_attention(q, k, v, *, layout, q_positions=None, kv_positions=None,
                           q_segment_ids=None, kv_segment_ids=None, scale, return_lse=False,
                           config: Config | None = None, interpret: bool = False):
    """See `api.block_sparse_attention`; `config` overrides the heuristic."""
    if q.dtype not in _DTYPES:
        raise NotImplementedError(f"{NAME}: dtype={q.dtype} is not supported; supported: "
                                  f"{[jnp.dtype(d).name for d in _DTYPES]}")
    if not interpret:
        if jax.default_backend() != "gpu":
            raise NotImplementedError(f"{NAME}: platform={jax.default_backend()!r} is not "
                                      "supported; supported: ('gpu',), or interpret=True")
        if jax_triton is None:
            raise NotImplementedError(f"{NAME}: needs the jax-triton package (pip install "
                                      "'lcjax[gpu]'); interpret=True runs without it")
    if config is None:
        config = default_config(q.shape, k.shape, v.shape, layout, interpret=interpret)
    elif interpret and not config.interpret:
        config = dataclasses.replace(config, interpret=True)
    problem = sparsity.plan(NAME, q, k, v, layout=layout, scale=scale, config=config,
                            q_positions=q_positions, kv_positions=kv_positions,
                            q_segment_ids=q_segment_ids, min_block=_MIN_BLOCK,
                            block_rule=f"powers of two >= {_MIN_BLOCK}")
    layout_constants(layout)  # refuse unsupported layouts before tracing anything
    padded = sparsity.prepare(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                              s_pad=problem.s_pad, t_pad=problem.t_pad,
                              pad_head_dims_to_pow2=True)
    return sparsity.run(problem, functools.partial(forward, config=config),
                        functools.partial(backward, config=config), *padded,
                        return_lse=return_lse)
