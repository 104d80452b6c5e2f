"""The "pallas_gpu" backend: Pallas through the Triton lowering (pallas_gpu_kernel.py).

Runs on a GPU; "pallas_gpu_interpret" runs the same kernel in the Pallas interpreter anywhere
(the CPU test path). Decode shapes: at most api.MAX_ROWS rows of x (padded to 16 for tl.dot).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.sparse_gemv import pallas_gpu_kernel
from pallas_kernels.sparse_gemv.checks import check_backend
from pallas_kernels.sparse_gemv.reference import active_rows

NAME = "pallas_gpu"
MAX_ROWS = 16
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")


def _pow2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class Config:
    """Kernel knobs: block_n output columns per program, block_k active rows per step, Triton
    warps and pipeline stages."""

    block_n: int = 128
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_n", "block_k", "num_warps"):
            if not _pow2(getattr(self, name)):
                raise ValueError(f"Config.{name}={getattr(self, name)!r} must be a power of 2")
        if self.block_k < 16 or self.block_n < 16:
            raise ValueError(f"Config block_k={self.block_k}, block_n={self.block_n}: tl.dot needs >= 16")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"Config.num_stages={self.num_stages!r} must be an int >= 1")


def default_config(t: int, k: int, n: int) -> Config:
    """Heuristic (untuned on hardware): the widest power-of-2 column tile up to 128 dividing N,
    so a 4096-wide output gets 32 programs; 32 active rows per step."""
    del t, k
    bn = 128
    while bn > 16 and n % bn:
        bn //= 2
    return Config(block_n=bn)


def search_space(t: int, k: int, n: int) -> tuple[Config, ...]:
    """Configs for the benchmark's search."""
    del t, k
    return tuple(Config(block_n=bn, block_k=bk, num_warps=w) for bn in (32, 64, 128, 256)
                 for bk in (16, 32, 64) for w in (2, 4, 8) if n % bn == 0)


def check(x, w, *, config=None, interpret=False) -> None:
    """Raise NotImplementedError for a case this backend cannot run."""
    check_backend(NAME, "gpu", Config, x, config, interpret, MAX_ROWS, SUPPORTED_DTYPES)
    cfg = config or default_config(*x.shape, w.shape[1])
    if w.shape[1] % cfg.block_n:
        raise NotImplementedError(f"{NAME}: N={w.shape[1]} is not a multiple of block_n="
                                  f"{cfg.block_n}; supported: N divisible by 16")


def sparse_gemv(x, w, *, config=None, interpret=False):
    check(x, w, config=config, interpret=interpret)
    t, k = x.shape
    cfg = config or default_config(t, k, w.shape[1])
    idx, count = active_rows(x)
    k_pad = -(-k // cfg.block_k) * cfg.block_k
    idx = jnp.pad(idx, (0, k_pad - k), mode="edge")  # padding: an active row, zero activations
    live = jnp.arange(k_pad) < count[0]
    x_act = jnp.where(live[None, :], jnp.take(x, idx, axis=1), jnp.zeros((), x.dtype))
    x_act = jnp.pad(x_act, ((0, 16 - t), (0, 0)))  # tl.dot needs >= 16 rows
    y = pallas_gpu_kernel.sparse_gemv(count, idx, x_act, w, block_k=cfg.block_k,
                                      block_n=cfg.block_n, num_warps=cfg.num_warps,
                                      num_stages=cfg.num_stages, interpret=interpret)
    return y[:t]
