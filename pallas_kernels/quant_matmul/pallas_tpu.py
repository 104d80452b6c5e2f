"""The "pallas_tpu" backend: Mosaic TPU kernel (pallas_tpu_kernel.py), every mode, dense and
grouped.

Runs on a TPU; "pallas_tpu_interpret" runs the same kernel in Pallas' TPU interpret mode
(pltpu.InterpretParams: also simulates TPU memories) on any platform, the CPU test path.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul import metadata
from pallas_kernels.quant_matmul import pallas_tpu_kernel
from pallas_kernels.quant_matmul.reference import Mode

NAME = "pallas_tpu"
SUPPORTED_X_DTYPES = ("int8", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Config:
    """Kernel knobs: [block_m, block_n] output tile, block_k (unpacked K) per grid step; with
    groups a step holds whole groups (block_k a multiple of group_size dividing K). A block
    larger than its dimension is clamped to it (Mosaic takes full-dimension blocks)."""

    block_m: int = 128
    block_k: int = 512
    block_n: int = 512

    def __post_init__(self):
        for name in ("block_m", "block_k", "block_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Config.{name}={value!r} must be a positive int")


def default_config(m: int, k: int, n: int, mode: Mode, num_experts: int = 1,
                   grouped: bool = False) -> Config:
    """Heuristic (untuned on hardware): 128-row tiles (32 for decode), k steps of up to 1024 that
    hold whole groups and divide K, 512-wide n tiles (1024 for decode: streams the weights)."""
    del grouped
    rows = max(1, m // max(num_experts, 1))
    bm, bk, bn = (32, 1024, 1024) if rows <= 64 else (128, 512, 512)
    if mode.group_size is not None:
        g = mode.group_size
        bk = max(g, bk // g * g)
        while bk > g and k % bk:
            bk -= g
    return Config(block_m=bm, block_k=bk, block_n=bn)


def search_space(m: int, k: int, n: int, mode: Mode, num_experts: int = 1) -> tuple[Config, ...]:
    """Configs for the benchmark's search."""
    del m, n, num_experts
    configs = []
    for bm, bk, bn in itertools.product((32, 128, 256), (256, 512, 1024, 2048),
                                        (256, 512, 1024, 2048)):
        if mode.group_size is not None and (bk % mode.group_size or k % bk):
            continue
        configs.append(Config(block_m=bm, block_k=bk, block_n=bn))
    return tuple(configs)


def _blocks(config: Config, m: int, k: int, n: int) -> Config:
    clamp = lambda block, dim: dim if dim <= block else block  # noqa: E731
    return Config(block_m=clamp(config.block_m, m), block_k=clamp(config.block_k, k),
                  block_n=clamp(config.block_n, n))


def check(x, w, *, mode: Mode, out_dtype, grouped: bool, config=None, interpret=False) -> None:
    """Raise NotImplementedError for a case this backend cannot run."""
    del out_dtype
    if config is not None and not isinstance(config, Config):
        raise ValueError(f"config={config!r} must be a {NAME}.Config")
    x_dtype = jnp.dtype(x.dtype).name
    if x_dtype not in SUPPORTED_X_DTYPES:
        raise NotImplementedError(f"{NAME}: x.dtype={x_dtype} is not supported; supported: "
                                  f"{SUPPORTED_X_DTYPES}")
    platform = jax.default_backend()
    if platform != "tpu" and not interpret:
        raise NotImplementedError(f"{NAME}: platform={platform!r} is not supported; supported: "
                                  f"('tpu',), or implementation='{NAME}_interpret' anywhere")
    m, k = x.shape
    n = w.shape[-1]
    config = _blocks(config or default_config(m, k, n, mode, w.shape[0] if grouped else 1),
                     m, k, n)
    g = mode.group_size
    if g is not None and (config.block_k % g or k % config.block_k):
        raise NotImplementedError(
            f"{NAME}: block_k={config.block_k} must be a multiple of group_size={g} that divides "
            f"K={k} (a step holds whole groups)")
    if mode.bits == 4 and config.block_k % 2:
        raise NotImplementedError(f"{NAME}: block_k={config.block_k} must be even with bits=4")
    if not interpret:  # Mosaic tiles a block's last two dims by (sublanes, 128 lanes)
        sublanes = 32 if mode.a8 else 16 if x_dtype == "bfloat16" else 8
        kp = k * mode.bits // 8
        bkp = config.block_k * mode.bits // 8
        for what, block, dim, multiple in (("block_m", config.block_m, m, sublanes),
                                           ("block_k", bkp, kp, 128),
                                           ("block_n", config.block_n, n, 128)):
            if block != dim and block % multiple:
                raise NotImplementedError(
                    f"{NAME}: {what}={block} must be a multiple of {multiple} (or the whole "
                    f"dimension {dim}) on TPU{' (packed rows for bits=4)' if what == 'block_k' and mode.bits == 4 else ''}")


def _interpret(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def quant_matmul(x, w, w_scale, x_scale, *, mode, alpha, out_dtype, config=None,
                 interpret=False):
    """See api.quant_matmul (arguments validated and normalised there)."""
    check(x, w, mode=mode, out_dtype=out_dtype, grouped=False, config=config,
          interpret=interpret)
    (m, k), n = x.shape, w.shape[1]
    config = _blocks(config or default_config(m, k, n, mode), m, k, n)
    ws = w_scale.reshape(1, -1, n)  # [1, 1, N] or [1, G, N]
    return pallas_tpu_kernel.quant_matmul(
        pallas_tpu_kernel.dense_visits(m, config.block_m), x, w[None], ws, x_scale, mode=mode,
        alpha=alpha, out_dtype=out_dtype, block_m=config.block_m, block_k=config.block_k,
        block_n=config.block_n, interpret=_interpret(interpret))


def quant_gmm(x, w, group_sizes, w_scale, x_scale, *, mode, alpha, out_dtype, config=None,
              interpret=False):
    """See api.quant_gmm (arguments validated and normalised there)."""
    check(x, w, mode=mode, out_dtype=out_dtype, grouped=True, config=config,
          interpret=interpret)
    (m, k), (e, _, n) = x.shape, w.shape
    config = _blocks(config or default_config(m, k, n, mode, e), m, k, n)
    visits = metadata.tile_visits(group_sizes, m, config.block_m, with_tail=True,
                                  visit_empty=False)
    ws = w_scale.reshape(e, -1, n)
    return pallas_tpu_kernel.quant_matmul(
        (visits.group_ids, visits.m_tile_ids, visits.offsets, visits.num_visits), x, w, ws,
        x_scale, mode=mode, alpha=alpha, out_dtype=out_dtype, block_m=config.block_m,
        block_k=config.block_k, block_n=config.block_n, interpret=_interpret(interpret))
