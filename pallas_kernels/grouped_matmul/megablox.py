"""The "megablox" backend: jax's own TPU grouped matmul (`jax.experimental.pallas.ops.tpu.megablox`).

Registered beside "pallas_tpu" so the two can be measured against each other on a TPU
(scripts/bench_gmm.py, scripts/device_check.py); runs anywhere with Config(interpret=True).
This wrapper pads rows to a multiple of the row tile (megablox requires it), clips group sizes
whose sum passes the row count, and zeroes rows past the groups (megablox leaves them unwritten).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools

import jax
import jax.numpy as jnp

# The package's __init__ re-exports `gmm` (a function) under the submodule's name.
_megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

SUPPORTED_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Config:
    """megablox's tiling: block_m rows, block_k contraction, block_n output columns per step."""

    block_m: int = 128
    block_k: int = 512
    block_n: int = 512
    interpret: bool = False

    def __post_init__(self):
        if not isinstance(self.interpret, bool):
            raise ValueError(f"Config.interpret={self.interpret!r} must be a bool")
        for name in ("block_m", "block_k", "block_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Config.{name}={value!r} must be a positive int")


def default_config(num_rows: int, k_dim: int, n_dim: int, num_groups: int, dtype,
                   kind: str = "gmm") -> Config:
    """Wide tiles, as pallas_tpu's default (untuned on hardware: bench_gmm --search decides)."""
    del num_rows, k_dim, n_dim, num_groups, dtype, kind
    return Config()


def search_space(num_rows: int, k_dim: int, n_dim: int, num_groups: int, dtype
                 ) -> tuple[Config, ...]:
    """Configs for the benchmark's search."""
    del num_rows, k_dim, n_dim, num_groups, dtype
    return tuple(Config(block_m=bm, block_k=bk, block_n=bn) for bm, bk, bn in
                 itertools.product((128, 256, 512), (256, 512, 1024), (256, 512, 1024)))


def check(lhs, rhs, *, out_dtype, config=None) -> None:
    """Raise NotImplementedError for a case this backend cannot run."""
    del rhs, out_dtype
    if config is not None and not isinstance(config, Config):
        raise ValueError(f"config={config!r} must be a megablox.Config")
    if jnp.dtype(lhs.dtype).name not in SUPPORTED_DTYPES:
        raise NotImplementedError(f"megablox: dtype={jnp.dtype(lhs.dtype).name} is not "
                                  f"supported; supported: {SUPPORTED_DTYPES}")
    platform = jax.default_backend()
    if platform != "tpu" and not (config is not None and config.interpret):
        raise NotImplementedError(f"megablox: platform={platform!r} is not supported; "
                                  "supported: ('tpu',), or any with Config(interpret=True)")


def _tiling(config: Config, m: int, k: int, n: int) -> tuple[int, int, int]:
    return min(config.block_m, m), min(config.block_k, k), min(config.block_n, n)


def _padded(x, rows: int):
    return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def _clipped_sizes(group_sizes, num_rows: int):
    """Group sizes whose sum is at most num_rows (the last groups lose the excess)."""
    ends = jnp.minimum(jnp.cumsum(group_sizes), num_rows)
    return jnp.diff(ends, prepend=0).astype(jnp.int32), ends[-1]


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None, config=None):
    """lhs [T, K] x rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [T, N] in out_dtype."""
    out_dtype = lhs.dtype if out_dtype is None else out_dtype
    check(lhs, rhs, out_dtype=out_dtype, config=config)
    (m, k), n = lhs.shape, rhs.shape[1] if transpose_rhs else rhs.shape[2]
    config = config or default_config(m, k, n, rhs.shape[0], lhs.dtype)
    tm, tk, tn = _tiling(config, m, k, n)
    rows = -(-m // tm) * tm
    sizes, used = _clipped_sizes(group_sizes, m)
    out = _megablox.gmm(_padded(lhs, rows), rhs, sizes, preferred_element_type=out_dtype,
                        tiling=(tm, tk, tn), transpose_rhs=transpose_rhs,
                        interpret=config.interpret)[:m]
    return jnp.where(jnp.arange(m)[:, None] < used, out, 0).astype(out_dtype)


def tgmm(lhs, rhs, group_sizes, *, out_dtype=None, config=None):
    """lhs [T, K], rhs [T, N] -> [G, K, N] in out_dtype: per-group lhs^T @ rhs."""
    out_dtype = lhs.dtype if out_dtype is None else out_dtype
    check(lhs, rhs, out_dtype=out_dtype, config=config)
    (m, k), n = lhs.shape, rhs.shape[1]
    config = config or default_config(m, k, n, group_sizes.shape[0], lhs.dtype, kind="tgmm")
    tm, tk, tn = _tiling(config, m, k, n)
    rows = -(-m // tm) * tm
    sizes, _ = _clipped_sizes(group_sizes, m)
    return _megablox.tgmm(_padded(lhs, rows).T, _padded(rhs, rows), sizes,
                          preferred_element_type=out_dtype, tiling=(tm, tk, tn),
                          interpret=config.interpret)
