"""The "pallas_gpu" backend: Pallas through the Triton lowering (pallas_gpu_kernel.py).

Runs on a GPU; "pallas_gpu_interpret" runs the same kernel in the Pallas interpreter anywhere
(the CPU test path). Decode shapes: at most api.MAX_ROWS rows of x (padded to 16 for tl.dot).
Two ways to skip inactive rows (Config.mode): "compact" lists the active rows first and gathers
them (measured 0.95x the dense GEMV on an H200 at s = 0.5); "masked" walks w in place with
row-masked loads, saving the compaction pass and its small XLA ops (not yet timed on a GPU).
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
    """Kernel knobs: block_n output columns per program, block_k active rows per step, splits
    spans of the active rows (split-K programs per column tile), Triton warps and pipeline
    stages."""

    block_n: int = 128
    block_k: int = 32
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    # "compact": gather the active rows through a compacted index list (one pass over x first);
    # "masked": walk w in place and load each row block under its activity mask (no pass first)
    mode: str = "compact"

    def __post_init__(self):
        for name in ("block_n", "block_k", "num_warps"):
            if not _pow2(getattr(self, name)):
                raise ValueError(f"Config.{name}={getattr(self, name)!r} must be a power of 2")
        if self.block_k < 16 or self.block_n < 16:
            raise ValueError(f"Config block_k={self.block_k}, block_n={self.block_n}: tl.dot needs >= 16")
        if self.mode not in ("compact", "masked"):
            raise ValueError(f"Config.mode={self.mode!r} must be 'compact' or 'masked'")
        for name in ("num_stages", "splits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Config.{name}={value!r} must be an int >= 1")


PROGRAMS = 512  # enough programs to keep every SM of an H100/H200 (132) busy a few times over


def default_config(t: int, k: int, n: int) -> Config:
    """The widest power-of-2 column tile up to 128 dividing N, 32 active rows per step, and
    split-K spans so that tiles x splits reaches PROGRAMS, each span at least 4 steps long
    (a decode GEMV has N / 128 = 48 tiles at N 6144: one span each would leave SMs idle)."""
    del t
    bn = 128
    while bn > 16 and n % bn:
        bn //= 2
    bk = 32
    splits = max(1, min(-(-PROGRAMS // (n // bn)), k // (4 * bk)))
    return Config(block_n=bn, block_k=bk, splits=splits)


def search_space(t: int, k: int, n: int) -> tuple[Config, ...]:
    """Configs for the benchmark's search."""
    del t, k
    return tuple(Config(block_n=bn, block_k=bk, splits=sp, num_warps=w)
                 for bn in (64, 128, 256) for bk in (32, 64) for sp in (1, 4, 8, 16)
                 for w in (4, 8) if n % bn == 0)


def tuning_probe(t: int, k: int, n: int) -> tuple[Config, ...]:
    """A short list around the default (split-K spans, row step, compacted vs masked row loads)
    that a device check can time in seconds, to see how far the heuristic is from tuned."""
    base = default_config(t, k, n)
    return tuple(dataclasses.replace(base, splits=sp, block_k=bk, num_warps=w, mode=mode)
                 for mode in ("compact", "masked") for sp in (8, 16, 32) for bk in (32, 64)
                 for w in (8,) if sp * bk <= max(k, bk))


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
    if cfg.mode == "masked":
        return _masked(x, w, cfg, interpret)
    idx, count = active_rows(x)
    k_pad = -(-k // cfg.block_k) * cfg.block_k
    idx = jnp.pad(idx, (0, k_pad - k), mode="edge")  # padding: an active row, zero activations
    live = jnp.arange(k_pad) < count[0]
    x_act = jnp.where(live[None, :], jnp.take(x, idx, axis=1), jnp.zeros((), x.dtype))
    x_act = jnp.pad(x_act, ((0, 16 - t), (0, 0)))  # tl.dot needs >= 16 rows
    y = pallas_gpu_kernel.sparse_gemv(count, idx, x_act, w, block_k=cfg.block_k,
                                      block_n=cfg.block_n, splits=cfg.splits,
                                      num_warps=cfg.num_warps,
                                      num_stages=cfg.num_stages, interpret=interpret)
    return y[:t].astype(x.dtype)


def _masked(x, w, cfg: Config, interpret: bool):
    """The masked kernel over the rows that fill whole blocks; the last K % block_k rows (fewer
    than a block) through XLA with inactive rows zeroed by a select, so they add nothing even
    when they hold NaN."""
    t, k = x.shape
    main = k - k % cfg.block_k
    y = jnp.zeros((t, w.shape[1]), jnp.float32)
    if main:
        xp = jnp.pad(x[:, :main], ((0, 16 - t), (0, 0)))  # tl.dot needs >= 16 rows
        y = pallas_gpu_kernel.masked_gemv(xp, w[:main], block_k=cfg.block_k, block_n=cfg.block_n,
                                          splits=cfg.splits, num_warps=cfg.num_warps,
                                          num_stages=cfg.num_stages, interpret=interpret)[:t]
    if main < k:
        xt, wt = x[:, main:], w[main:].astype(x.dtype)
        wt = jnp.where(jnp.any(xt != 0, axis=0)[:, None], wt, jnp.zeros((), wt.dtype))
        y = y + jnp.dot(xt, wt, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
