"""The "pallas_tpu" backend: Mosaic TPU kernels (pallas_tpu_kernel.py).

Runs on a TPU, or anywhere with Config(interpret=True) (the Pallas interpreter) or
Config(interpret=pltpu.InterpretParams()) (TPU interpret mode: also simulates TPU memories).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul import pallas_tpu_kernel

SUPPORTED_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Config:
    """Kernel knobs. gmm: [block_m, block_n] output tile, block_k contraction step. tgmm:
    [block_k, block_n] tile of out[g], block_m rows per contraction step. A block larger than
    its dimension is clamped to it (Mosaic takes full-dimension blocks of any size)."""

    block_m: int = 128
    block_k: int = 512
    block_n: int = 512
    interpret: bool | pltpu.InterpretParams = False

    def __post_init__(self):
        if not isinstance(self.interpret, (bool, pltpu.InterpretParams)):
            raise ValueError(f"Config.interpret={self.interpret!r} must be a bool or a "
                             "pltpu.InterpretParams")
        # Mosaic tiles a block's last two dims by (8 sublanes, 128 lanes).
        multiples = dict(block_m=8, block_k=128, block_n=128)
        for name, multiple in multiples.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Config.{name}={value!r} must be a positive int")
            if not self.interpret and value % multiple:
                raise ValueError(f"Config.{name}={value} must be a multiple of {multiple} on TPU "
                                 "(any size with interpret=True)")


def default_config(num_rows: int, k_dim: int, n_dim: int, num_groups: int, dtype,
                   kind: str = "gmm") -> Config:
    """Heuristic (untuned on hardware). Row tiles of 128 keep the per-group padding waste small
    (half a tile per group); wide k/n blocks amortise the ~0.35 us per-grid-step overhead."""
    del num_rows, k_dim, n_dim, num_groups
    wide = jnp.dtype(dtype).itemsize >= 4
    if kind == "tgmm":
        return Config(block_m=256 if wide else 512, block_k=512, block_n=512)
    return Config(block_m=128, block_k=256 if wide else 512, block_n=512 if wide else 1024)


def search_space(num_rows: int, k_dim: int, n_dim: int, num_groups: int, dtype
                 ) -> tuple[Config, ...]:
    """Configs for the benchmark's search."""
    del num_rows, k_dim, n_dim, num_groups, dtype
    return tuple(Config(block_m=bm, block_k=bk, block_n=bn) for bm, bk, bn in
                 itertools.product((128, 256, 512), (256, 512, 1024), (256, 512, 1024, 2048)))


def check(lhs, rhs, *, out_dtype, config=None) -> None:
    """Raise NotImplementedError for a case this backend cannot run."""
    del rhs, out_dtype
    if config is not None and not isinstance(config, Config):
        raise ValueError(f"config={config!r} must be a pallas_tpu.Config")
    if jnp.dtype(lhs.dtype).name not in SUPPORTED_DTYPES:
        raise NotImplementedError(f"pallas_tpu: dtype={jnp.dtype(lhs.dtype).name} is not "
                                  f"supported; supported: {SUPPORTED_DTYPES}")
    platform = jax.default_backend()
    if platform != "tpu" and not (config is not None and config.interpret is not False):
        raise NotImplementedError(f"pallas_tpu: platform={platform!r} is not supported; "
                                  "supported: ('tpu',), or any with Config(interpret=True)")


def _blocks(config: Config, m: int, k: int, n: int) -> dict:
    clamp = lambda block, dim: dim if dim <= block else block  # noqa: E731
    return dict(block_m=clamp(config.block_m, m), block_k=clamp(config.block_k, k),
                block_n=clamp(config.block_n, n), interpret=config.interpret)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None, config=None):
    """lhs [T, K] x rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [T, N] in out_dtype."""
    out_dtype = lhs.dtype if out_dtype is None else out_dtype
    check(lhs, rhs, out_dtype=out_dtype, config=config)
    (m, k), n = lhs.shape, rhs.shape[1] if transpose_rhs else rhs.shape[2]
    config = config or default_config(m, k, n, rhs.shape[0], lhs.dtype)
    return pallas_tpu_kernel.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                                 out_dtype=out_dtype, **_blocks(config, m, k, n))


def tgmm(lhs, rhs, group_sizes, *, out_dtype=None, config=None):
    """lhs [T, K], rhs [T, N] -> [G, K, N] in out_dtype: per-group lhs^T @ rhs."""
    out_dtype = lhs.dtype if out_dtype is None else out_dtype
    check(lhs, rhs, out_dtype=out_dtype, config=config)
    (m, k), n = lhs.shape, rhs.shape[1]
    config = config or default_config(m, k, n, group_sizes.shape[0], lhs.dtype, kind="tgmm")
    return pallas_tpu_kernel.tgmm(lhs, rhs, group_sizes, out_dtype=out_dtype,
                                  **_blocks(config, m, k, n))
