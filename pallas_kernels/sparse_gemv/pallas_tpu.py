"""The "pallas_tpu" backend: Mosaic TPU kernel (pallas_tpu_kernel.py).

Runs on a TPU; "pallas_tpu_interpret" runs the same kernel in Pallas' TPU interpret mode
(pltpu.InterpretParams: also simulates TPU memories) on any platform, the CPU test path.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_gemv import pallas_tpu_kernel
from pallas_kernels.sparse_gemv.checks import check_backend
from pallas_kernels.sparse_gemv.reference import active_rows

NAME = "pallas_tpu"
MAX_ROWS = 16
SUPPORTED_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Config:
    """block_n: output columns per program (a multiple of 128 on hardware, or N itself)."""

    block_n: int = 512

    def __post_init__(self):
        if not isinstance(self.block_n, int) or isinstance(self.block_n, bool) or self.block_n <= 0:
            raise ValueError(f"Config.block_n={self.block_n!r} must be a positive int")


def default_config(t: int, k: int, n: int) -> Config:
    """Heuristic (untuned): 512-wide column tiles when they divide N, else N itself."""
    del t, k
    return Config(block_n=512 if n % 512 == 0 else n)


def search_space(t: int, k: int, n: int) -> tuple[Config, ...]:
    del t, k
    return tuple(Config(block_n=bn) for bn in (128, 256, 512, 1024, 2048) if n % bn == 0)


def check(x, w, *, config=None, interpret=False) -> None:
    """Raise NotImplementedError for a case this backend cannot run."""
    check_backend(NAME, "tpu", Config, x, config, interpret, MAX_ROWS, SUPPORTED_DTYPES)
    bn = (config or default_config(*x.shape, w.shape[1])).block_n
    if w.shape[1] % bn or (not interpret and bn % 128 and bn != w.shape[1]):
        raise NotImplementedError(f"{NAME}: block_n={bn} must divide N={w.shape[1]} and be a "
                                  "multiple of 128 (or N) on hardware")


def sparse_gemv(x, w, *, config=None, interpret=False):
    check(x, w, config=config, interpret=interpret)
    t, k = x.shape
    cfg = config or default_config(t, k, w.shape[1])
    idx, count = active_rows(x)
    x_act = jnp.take(x, idx, axis=1).T[:, :, None]  # [K, T, 1]
    return pallas_tpu_kernel.sparse_gemv(idx, count, x_act, w, block_n=cfg.block_n,
                                         interpret=pltpu.InterpretParams() if interpret else False)
