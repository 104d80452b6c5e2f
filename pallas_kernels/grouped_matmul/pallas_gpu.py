"""The "pallas_gpu" backend: Pallas kernels through the Triton lowering (pallas_gpu_kernel.py).

Runs on a GPU, or anywhere with Config(interpret=True) (the Pallas interpreter: same kernel
code, the CPU test path).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import pallas_gpu_kernel

SUPPORTED_DTYPES = ("bfloat16", "float32")
_SMEM_BYTES = 200 * 1024  # H100 has 227 KiB of shared memory per block; keep headroom


def _pow2(x: int) -> bool:
    return isinstance(x, int) and x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class Config:
    """Kernel knobs. gmm: [block_m, block_n] output tile, block_k contraction step. tgmm: block_k x
    block_n output tile of out[g], block_m rows per step of the contraction over a group."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    interpret: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not _pow2(value) or value < 16:
                raise ValueError(f"Config.{name}={value!r} must be a power of 2 >= 16 (tl.dot's "
                                 "minimum)")
        if not _pow2(self.num_warps) or self.num_warps > 16:
            raise ValueError(f"Config.num_warps={self.num_warps!r} must be 1, 2, 4, 8 or 16")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"Config.num_stages={self.num_stages!r} must be an int >= 1")
        if not isinstance(self.interpret, bool):
            raise ValueError(f"Config.interpret={self.interpret!r} must be a bool")

    def smem_bytes(self, itemsize: int) -> int:
        """Shared memory of the pipelined gmm operand buffers."""
        return self.num_stages * (self.block_m + self.block_n) * self.block_k * itemsize


def _clamp_pow2(block: int, dim: int) -> int:
    """block, shrunk to the next power of 2 >= dim (>= 16) when the dim is small."""
    return max(16, min(block, 1 << max(dim - 1, 1).bit_length()))


def default_config(num_rows: int, k_dim: int, n_dim: int, num_groups: int, dtype,
                   kind: str = "gmm") -> Config:
    """Heuristic (untuned: scripts/bench_gmm.py --search measures the space below).

    gmm: a row tile of 128 wastes on average half a tile per group, so with few rows per group
    (< 512) take 64-row tiles. tgmm: 128 x 128 output blocks, 64-row contraction steps.
    """
    wide = jnp.dtype(dtype).itemsize >= 4
    if kind == "tgmm":
        bm, bn, bk, warps, stages = (32 if wide else 64), 128, 128, 8, 3
        return Config(block_m=_clamp_pow2(bm, num_rows // max(num_groups, 1)),
                      block_n=_clamp_pow2(bn, n_dim), block_k=_clamp_pow2(bk, k_dim),
                      num_warps=warps, num_stages=stages)
    if num_rows < 512 * num_groups:
        bm, bn, bk, warps, stages = 64, 128, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 256, 64, 8, 3
    if wide:
        bk, stages = 32, 3
    return Config(block_m=_clamp_pow2(bm, num_rows), block_n=_clamp_pow2(bn, n_dim),
                  block_k=_clamp_pow2(bk, k_dim), num_warps=warps, num_stages=stages)


def search_space(num_rows: int, k_dim: int, n_dim: int, num_groups: int, dtype
                 ) -> tuple[Config, ...]:
    """Configs for the benchmark's search, pruned to those whose buffers fit shared memory."""
    del num_groups
    itemsize = jnp.dtype(dtype).itemsize
    configs = []
    for bm, bn, bk, warps, stages in itertools.product((64, 128), (64, 128, 256), (32, 64, 128),
                                                       (4, 8), (3, 4, 5)):
        c = Config(block_m=_clamp_pow2(bm, num_rows), block_n=_clamp_pow2(bn, n_dim),
                   block_k=_clamp_pow2(bk, k_dim), num_warps=warps, num_stages=stages)
        if c.smem_bytes(itemsize) <= _SMEM_BYTES and c not in configs:
            configs.append(c)
    return tuple(configs)


def check(lhs, rhs, *, out_dtype, config=None) -> None:
    """Raise NotImplementedError for a case this backend cannot run."""
    del rhs, out_dtype
    if config is not None and not isinstance(config, Config):
        raise ValueError(f"config={config!r} must be a pallas_gpu.Config")
    if jnp.dtype(lhs.dtype).name not in SUPPORTED_DTYPES:
        raise NotImplementedError(f"pallas_gpu: dtype={jnp.dtype(lhs.dtype).name} is not "
                                  f"supported; supported: {SUPPORTED_DTYPES}")
    platform = jax.default_backend()
    if platform != "gpu" and not (config is not None and config.interpret):
        raise NotImplementedError(f"pallas_gpu: platform={platform!r} is not supported; "
                                  "supported: ('gpu',), or any with Config(interpret=True)")


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None, config=None):
    """lhs [T, K] x rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [T, N] in out_dtype."""
    out_dtype = lhs.dtype if out_dtype is None else out_dtype
    check(lhs, rhs, out_dtype=out_dtype, config=config)
    n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if config is None:
        config = default_config(lhs.shape[0], lhs.shape[1], n_dim, rhs.shape[0], lhs.dtype)
    return pallas_gpu_kernel.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                                 out_dtype=out_dtype, **dataclasses.asdict(config))


def tgmm(lhs, rhs, group_sizes, *, out_dtype=None, config=None):
    """lhs [T, K], rhs [T, N] -> [G, K, N] in out_dtype: per-group lhs^T @ rhs."""
    out_dtype = lhs.dtype if out_dtype is None else out_dtype
    check(lhs, rhs, out_dtype=out_dtype, config=config)
    if config is None:
        config = default_config(lhs.shape[0], lhs.shape[1], rhs.shape[1], group_sizes.shape[0],
                                lhs.dtype, kind="tgmm")
    return pallas_gpu_kernel.tgmm(lhs, rhs, group_sizes, out_dtype=out_dtype,
                                  **dataclasses.asdict(config))
