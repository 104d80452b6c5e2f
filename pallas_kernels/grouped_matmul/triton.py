"""The "triton" backend: hand-written Triton kernels (triton_kernel.py) called with jax-triton.

Importing this module needs jax-triton, which needs a GPU jaxlib: elsewhere the import fails and
api.py leaves the backend unregistered. The kernels themselves are tested on CPU under
TRITON_INTERPRET=1 with torch tensors (triton_test.py), through the same `*_launch` helpers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import jax_triton as jt

from pallas_kernels.grouped_matmul import metadata, pallas_gpu, triton_kernel

SUPPORTED_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Config:
    """Kernel knobs, as pallas_gpu.Config without `interpret` (interpretation is Triton's own,
    TRITON_INTERPRET=1, which jax-triton cannot drive)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        pallas_gpu.Config(**dataclasses.asdict(self))  # same invariants; raises ValueError


def _from_pallas(config: pallas_gpu.Config) -> Config:
    fields = dataclasses.asdict(config)
    fields.pop("interpret")
    return Config(**fields)


def default_config(num_rows: int, k_dim: int, n_dim: int, num_groups: int, dtype,
                   kind: str = "gmm") -> Config:
    """The pallas_gpu heuristic: the two backends tile the same way."""
    return _from_pallas(pallas_gpu.default_config(num_rows, k_dim, n_dim, num_groups, dtype, kind))


def search_space(num_rows: int, k_dim: int, n_dim: int, num_groups: int, dtype
                 ) -> tuple[Config, ...]:
    return tuple(_from_pallas(c) for c in
                 pallas_gpu.search_space(num_rows, k_dim, n_dim, num_groups, dtype))


def check(lhs, rhs, *, out_dtype, config=None) -> None:
    """Raise NotImplementedError for a case this backend cannot run."""
    del rhs, out_dtype
    if config is not None and not isinstance(config, Config):
        raise ValueError(f"config={config!r} must be a triton.Config")
    if jnp.dtype(lhs.dtype).name not in SUPPORTED_DTYPES:
        raise NotImplementedError(f"triton: dtype={jnp.dtype(lhs.dtype).name} is not "
                                  f"supported; supported: {SUPPORTED_DTYPES}")
    platform = jax.default_backend()
    if platform != "gpu":
        raise NotImplementedError(f"triton: platform={platform!r} is not supported; "
                                  "supported: ('gpu',)")


def gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None, config=None):
    """lhs [T, K] x rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [T, N] in out_dtype."""
    out_dtype = lhs.dtype if out_dtype is None else out_dtype
    check(lhs, rhs, out_dtype=out_dtype, config=config)
    (num_rows, k_dim), num_groups = lhs.shape, rhs.shape[0]
    n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    config = config or default_config(num_rows, k_dim, n_dim, num_groups, lhs.dtype)
    tiles = metadata.row_tiles(group_sizes, num_rows, config.block_m).table
    grid, constexprs = triton_kernel.gmm_launch(
        num_rows=num_rows, k_dim=k_dim, n_dim=n_dim, num_groups=num_groups,
        num_tiles=tiles.shape[1], transpose_rhs=transpose_rhs,
        dtype_name=jnp.dtype(lhs.dtype).name, block_m=config.block_m, block_n=config.block_n,
        block_k=config.block_k)
    return jt.triton_call(
        tiles, lhs, rhs, kernel=triton_kernel.gmm_kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, n_dim), out_dtype), grid=grid,
        num_warps=config.num_warps, num_stages=config.num_stages, name="gmm", **constexprs)


def tgmm(lhs, rhs, group_sizes, *, out_dtype=None, config=None):
    """lhs [T, K], rhs [T, N] -> [G, K, N] in out_dtype: per-group lhs^T @ rhs."""
    out_dtype = lhs.dtype if out_dtype is None else out_dtype
    check(lhs, rhs, out_dtype=out_dtype, config=config)
    (num_rows, k_dim), n_dim, num_groups = lhs.shape, rhs.shape[1], group_sizes.shape[0]
    config = config or default_config(num_rows, k_dim, n_dim, num_groups, lhs.dtype,
                                      kind="tgmm")
    offsets = metadata.group_offsets(group_sizes, num_rows)
    grid, constexprs = triton_kernel.tgmm_launch(
        num_rows=num_rows, k_dim=k_dim, n_dim=n_dim, num_groups=num_groups,
        dtype_name=jnp.dtype(lhs.dtype).name, block_m=config.block_m, block_n=config.block_n,
        block_k=config.block_k)
    return jt.triton_call(
        offsets, lhs, rhs, kernel=triton_kernel.tgmm_kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k_dim, n_dim), out_dtype), grid=grid,
        num_warps=config.num_warps, num_stages=config.num_stages, name="tgmm", **constexprs)
