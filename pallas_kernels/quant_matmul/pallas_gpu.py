"""The "pallas_gpu" backend: Pallas through the Triton lowering (pallas_gpu_kernel.py).

Runs on a GPU; "pallas_gpu_interpret" runs the same kernel in the Pallas interpreter anywhere
(the CPU test path). Every mode, dense and grouped.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul import common, pallas_gpu_kernel
from pallas_kernels.quant_matmul.reference import Mode

NAME = "pallas_gpu"
SUPPORTED_X_DTYPES = ("int8", "bfloat16", "float16", "float32")
_SMEM_BYTES = 200 * 1024  # H100: 227 KiB of shared memory per block; keep headroom
_NUM_SMS = 132  # H100 SXM


def _pow2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class Config:
    """Kernel knobs: [block_m, block_n] output tile, block_k (unpacked K) per main-loop step,
    split_k independent K ranges (partial accumulators summed by XLA; for decode shapes with few
    output tiles), Triton warps and pipeline stages."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "split_k"):
            if not _pow2(getattr(self, name)):
                raise ValueError(f"Config.{name}={getattr(self, name)!r} must be a power of 2")
        if not _pow2(self.num_warps) or self.num_warps > 16:
            raise ValueError(f"Config.num_warps={self.num_warps!r} must be 1, 2, 4, 8 or 16")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"Config.num_stages={self.num_stages!r} must be an int >= 1")

    def smem_bytes(self, x_itemsize: int, bits: int) -> int:
        """Shared memory of the pipelined operand buffers."""
        return self.num_stages * self.block_k * (self.block_m * x_itemsize
                                                 + self.block_n * bits // 8)


def _clamp(block: int, dim: int, floor: int = 16) -> int:
    """block, shrunk to the next power of 2 >= dim (>= floor) when the dim is small."""
    return max(floor, min(block, 1 << max(dim - 1, 1).bit_length()))


def default_config(m: int, k: int, n: int, mode: Mode, num_experts: int = 1,
                   grouped: bool = False) -> Config:
    """Heuristic (untuned: scripts/bench_quant_matmul.py --search measures the space below).

    Decode (rows per expert <= 64): 16-row tiles, narrow n tiles and long k steps stream the
    weights; split K until ~2 programs per SM. Prefill: 128 x 256 tiles, 8 warps. block_k never
    exceeds the group size.
    """
    rows = max(1, m // max(num_experts, 1))
    if rows <= 64:
        bm, bn, bk, warps, stages = 16, 64, 256 if mode.bits == 4 else 128, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 256, 128, 8, 3
    if not mode.a8 and rows > 64:
        bk = 64
    bk = _clamp(bk, k, 32 if mode.bits == 8 else 64)
    if mode.group_size is not None:
        bk = min(bk, mode.group_size & -mode.group_size)  # largest power of 2 dividing g
    bm, bn = _clamp(bm, m), _clamp(bn, n)
    split = 1
    if rows <= 64 and not grouped:
        units = -(-k // bk) if mode.group_size is None else k // mode.group_size
        tiles = -(-n // bn) * -(-m // bm)
        split = common.pick_split_k(units, tiles, 2 * _NUM_SMS)
    return Config(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps,
                  num_stages=stages)


def search_space(m: int, k: int, n: int, mode: Mode, num_experts: int = 1) -> tuple[Config, ...]:
    """Configs for the benchmark's search, pruned to those that fit shared memory and the K
    plan (block_k dividing the group size, split_k dividing the groups / blocks)."""
    decode = m // max(num_experts, 1) <= 64
    x_itemsize = 1 if mode.a8 else 2
    configs = []
    for bm, bn, bk, split, warps, stages in itertools.product(
            (16,) if decode else (64, 128), (32, 64, 128) if decode else (128, 256),
            (64, 128, 256), (1, 2, 4, 8) if decode else (1,), (4, 8), (3, 4, 5)):
        c = Config(block_m=_clamp(bm, m), block_n=_clamp(bn, n), block_k=_clamp(bk, k, 32),
                   split_k=split, num_warps=warps, num_stages=stages)
        if c.smem_bytes(x_itemsize, mode.bits) > _SMEM_BYTES or c in configs:
            continue
        try:
            common.k_plan(NAME, mode, k, c.block_k, c.split_k)
        except NotImplementedError:
            continue
        configs.append(c)
    return tuple(configs)


def check(x, w, *, mode: Mode, out_dtype, grouped: bool, config=None, interpret=False,
          name: str = NAME) -> None:
    """Raise NotImplementedError for a case this backend cannot run (`name`: the backend that
    shares these limits, for the message)."""
    del out_dtype
    if config is not None and not isinstance(config, Config):
        raise ValueError(f"config={config!r} must be a {NAME}.Config")
    x_dtype = jnp.dtype(x.dtype).name
    if x_dtype not in SUPPORTED_X_DTYPES:
        raise NotImplementedError(f"{name}: x.dtype={x_dtype} is not supported; supported: "
                                  f"{SUPPORTED_X_DTYPES}")
    platform = jax.default_backend()
    if platform != "gpu" and not interpret:
        raise NotImplementedError(f"{name}: platform={platform!r} is not supported; supported: "
                                  f"('gpu',), or implementation='{name}_interpret' anywhere")
    if config is None:
        config = default_config(x.shape[0], x.shape[1], w.shape[-1], mode,
                                num_experts=w.shape[0] if grouped else 1, grouped=grouped)
    common.k_plan(name, mode, x.shape[1], config.block_k, 1 if grouped else config.split_k)
    if grouped and config.split_k != 1:
        raise NotImplementedError(f"{name}: split_k={config.split_k} is not supported by "
                                  "quant_gmm; supported: 1")
    if not interpret:
        per_byte = 8 // mode.bits
        min_k = 32 if mode.a8 else 16  # tensor-core MMA shapes: k >= 32 (int8) / 16 (16-bit)
        if config.block_k // per_byte < min_k or config.block_m < 16 or config.block_n < 16:
            raise NotImplementedError(
                f"{name}: block_k={config.block_k} (bits={mode.bits}), block_m={config.block_m}, "
                f"block_n={config.block_n} are below the MMA minimum (each dot's k >= {min_k}, "
                "m, n >= 16)")


def _run(x, w, w_scale, x_scale, tiles, *, mode, alpha, out_dtype, config, interpret,
         row_expert=None):
    plan = common.k_plan(NAME, mode, x.shape[1], config.block_k, config.split_k)
    out = pallas_gpu_kernel.quant_matmul(
        tiles, x, w, w_scale, x_scale, mode=mode, alpha=alpha, out_dtype=out_dtype, plan=plan,
        block_m=config.block_m, block_n=config.block_n, num_warps=config.num_warps,
        num_stages=config.num_stages, interpret=interpret)
    if plan.split_k == 1:
        return out
    return common.finish(out, x_scale, w_scale.reshape(-1, w_scale.shape[-1]), mode=mode,
                         alpha=alpha, out_dtype=out_dtype, row_expert=row_expert)


def quant_matmul(x, w, w_scale, x_scale, *, mode, alpha, out_dtype, config=None,
                 interpret=False):
    """See api.quant_matmul (arguments validated and normalised there)."""
    check(x, w, mode=mode, out_dtype=out_dtype, grouped=False, config=config,
          interpret=interpret)
    m, k = x.shape
    config = config or default_config(m, k, w.shape[1], mode)
    tiles = common.dense_row_tiles(m, config.block_m)
    return _run(x, w[None], w_scale[None], x_scale, tiles, mode=mode, alpha=alpha,
                out_dtype=out_dtype, config=config, interpret=interpret)


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
