"""Attention layouts: small frozen, hashable objects that say which (query, key) pairs may attend.

Every layout answers three questions, all from the same predicate `_allowed(q, k, xp)`:

* `allowed(q_pos, k_pos)` — elementwise, in jnp, on broadcasting integer arrays of ABSOLUTE
  positions. This is what a model uses when key positions come from cache slots. A key position
  < 0 marks an empty slot and is never allowed; that rule lives here, once, for every layout.
* `to_dense(q_len, kv_len)` — a host numpy bool matrix for references and tests.
* `block_metadata(q_len, kv_len, block_q, block_k)` — host numpy, cached: for each query block the
  compacted list of key blocks with at least one allowed pair, and whether each is full (no element
  mask needed) or partial. Kernels iterate this list, so their work scales with the mask density.

Layouts compose with `&` and `|`. Segment ids and empty cache slots are runtime data, not part of a
layout; kernels apply them elementwise on top of the block metadata.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Block states in `BlockMetadata.block_state`.
EMPTY, PARTIAL, FULL = 0, 1, 2


class Layout(abc.ABC):
    """Base class of attention layouts. Subclasses are frozen dataclasses (hashable, comparable)."""

    @abc.abstractmethod
    def _allowed(self, q: Any, k: Any, xp: Any) -> Any:
        """The layout's predicate on broadcast integer positions, written for `xp` in {np, jnp}."""

    @abc.abstractmethod
    def _block_bounds(self, a, b, c, d) -> tuple[np.ndarray, np.ndarray]:
        """Bounds on blocks of queries [a, b] x keys [c, d] (inclusive, non-negative int arrays).

        Returns `(maybe_any, surely_all)`: False in `maybe_any` proves the block has no allowed
        pair, True in `surely_all` proves every pair is allowed. Layouts whose bounds are tight set
        `_exact_bounds = True`; otherwise `block_metadata` settles the uncertain blocks densely.
        """

    _exact_bounds: bool = True

    def allowed(self, q_pos, k_pos) -> jnp.ndarray:
        """Bool array, broadcast of `q_pos` and `k_pos` (absolute positions); `k_pos < 0` is never
        allowed (empty cache slot)."""
        q, k = jnp.asarray(q_pos), jnp.asarray(k_pos)
        if not (jnp.issubdtype(q.dtype, jnp.integer) and jnp.issubdtype(k.dtype, jnp.integer)):
            raise ValueError(f"positions must be integer arrays, got {q.dtype} and {k.dtype}")
        return self._allowed(q, k, jnp) & (k >= 0)

    def to_dense(self, q_len: int, kv_len: int, *, q_offset: int = 0) -> np.ndarray:
        """Host bool matrix [q_len, kv_len]; query i sits at position i + q_offset, key j at j."""
        _check_sizes(q_len=q_len, kv_len=kv_len)
        q = np.arange(q_len, dtype=np.int64)[:, None] + q_offset
        k = np.arange(kv_len, dtype=np.int64)[None, :]
        return np.broadcast_to(self._allowed(q, k, np) & (k >= 0), (q_len, kv_len)).copy()

    def block_metadata(self, q_len: int, kv_len: int, block_q: int, block_k: int, *,
                       q_offset: int = 0) -> BlockMetadata:
        """Active key blocks per query block for positions `arange(q_len) + q_offset` against
        `arange(kv_len)`, cached per (layout, sizes). Host cost O(#blocks) for the primitive
        layouts; composed layouts also evaluate their undecided blocks element by element."""
        _check_sizes(q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k)
        if q_offset < 0:
            raise ValueError(f"q_offset={q_offset} must be >= 0")
        return _block_metadata(self, int(q_len), int(kv_len), int(block_q), int(block_k),
                               int(q_offset))

    def __and__(self, other: Layout) -> Layout:
        return AndLayout((self, other))

    def __or__(self, other: Layout) -> Layout:
        return OrLayout((self, other))


def _block_of(x, block_size: int, xp):
    """x // block_size. On jnp a truncating division: equal to the floor for x >= 0, and every
    negative (empty-slot) key is rejected by `allowed` anyway; kernels then lower it without the
    sign fix-ups of floor division."""
    if xp is np:
        return x // block_size
    x = jnp.asarray(x)
    return jax.lax.div(x, np.asarray(block_size, x.dtype))


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name}={value!r} must be an integer >= {minimum}")


@dataclasses.dataclass(frozen=True)
class FullLayout(Layout):
    """Every key is visible (bidirectional)."""

    def _allowed(self, q, k, xp):
        return xp.ones(xp.broadcast_shapes(q.shape, k.shape), dtype=bool)

    def _block_bounds(self, a, b, c, d):
        ones = np.ones(np.broadcast_shapes(a.shape, c.shape), dtype=bool)
        return ones, ones


@dataclasses.dataclass(frozen=True)
class CausalLayout(Layout):
    """k <= q."""

    def _allowed(self, q, k, xp):
        return k <= q

    def _block_bounds(self, a, b, c, d):
        return c <= b, d <= a


@dataclasses.dataclass(frozen=True)
class SlidingWindowLayout(Layout):
    """Causal with a window of `window` keys including the query's own: q - window < k <= q."""

    window: int

    def __post_init__(self):
        _check_int("SlidingWindowLayout", "window", self.window, 1)

    def _allowed(self, q, k, xp):
        return (k <= q) & (k > q - self.window)

    def _block_bounds(self, a, b, c, d):
        w = self.window
        return np.maximum(a, c) <= np.minimum(b, d + w - 1), (d <= a) & (c >= b - w + 1)


@dataclasses.dataclass(frozen=True)
class LozaLayout(Layout):
    """LoZA streaming-sparse attention (spec §4): causal, restricted to `sink_blocks` leading key
    blocks plus the `local_blocks` block-aligned blocks ending with the query's own block.

        allowed(q, k) = k <= q AND (k // B < sink_blocks OR k // B >= q // B - (local_blocks - 1))

    Positions are 0-based within one sequence; sequences shorter than (sink + local) * B tokens
    see a plain causal mask.
    """

    block_size: int = 128
    sink_blocks: int = 1
    local_blocks: int = 7

    def __post_init__(self):
        _check_int("LozaLayout", "block_size", self.block_size, 1)
        _check_int("LozaLayout", "sink_blocks", self.sink_blocks, 0)
        _check_int("LozaLayout", "local_blocks", self.local_blocks, 1)

    def _local_start(self, q):
        """First key position of the local window of a query at position q (block aligned)."""
        return (q // self.block_size - (self.local_blocks - 1)) * self.block_size

    def _allowed(self, q, k, xp):
        k_block, q_block = _block_of(k, self.block_size, xp), _block_of(q, self.block_size, xp)
        sink = k_block < self.sink_blocks
        local = k_block >= q_block - (self.local_blocks - 1)
        return (k <= q) & (sink | local)

    def _block_bounds(self, a, b, c, d):
        sink_end = self.sink_blocks * self.block_size  # k < sink_end <=> k in a sink block
        any_sink = (c < sink_end) & (c <= b)
        # The local start is monotone in q, so the earliest query that can see key c decides.
        first_q = np.maximum(a, c)
        any_local = (first_q <= b) & (self._local_start(first_q) <= d)
        # Every pair is allowed iff causal everywhere and no key falls in the gap
        # [sink_end, local_start(b)) of the last query.
        gap_end = self._local_start(b)
        no_gap = (d < sink_end) | (c >= gap_end) | (sink_end >= gap_end)
        return any_sink | any_local, (d <= a) & no_gap


@dataclasses.dataclass(frozen=True)
class BlockMaskLayout(Layout):
    """Arbitrary boolean mask over `block_size` x `block_size` blocks, causal within.

    `mask[i][j]` says whether query block i may see key block j; positions beyond the mask are not
    allowed. Accepts nested sequences or a 2-D numpy array and stores a tuple of tuples of bool.
    """

    mask: Any  # nested sequence or 2-D array; stored as tuple[tuple[bool, ...], ...]
    block_size: int

    def __post_init__(self):
        _check_int("BlockMaskLayout", "block_size", self.block_size, 1)
        table = np.asarray(self.mask)
        if table.ndim != 2 or table.size == 0 or table.dtype != np.bool_:
            raise ValueError(f"BlockMaskLayout.mask must be a non-empty 2-D bool table, got "
                             f"shape {table.shape} dtype {table.dtype}")
        object.__setattr__(self, "mask", tuple(tuple(bool(x) for x in row) for row in table))

    @functools.cached_property
    def _table(self) -> np.ndarray:
        return np.asarray(self.mask, dtype=bool)

    def _allowed(self, q, k, xp):
        rows, cols = self._table.shape
        qb, kb = _block_of(q, self.block_size, xp), _block_of(k, self.block_size, xp)
        inside = (qb >= 0) & (qb < rows) & (kb >= 0) & (kb < cols)
        hit = xp.asarray(self._table)[xp.clip(qb, 0, rows - 1), xp.clip(kb, 0, cols - 1)]
        return (k <= q) & inside & hit

    def _block_bounds(self, a, b, c, d):
        # Visit every mask block that the kernel block touches; each piece is a rectangle.
        bs, (rows, cols) = self.block_size, self._table.shape
        shape = np.broadcast_shapes(a.shape, c.shape)
        any_, all_ = np.zeros(shape, dtype=bool), np.ones(shape, dtype=bool)
        span_q = int(np.max(b // bs - a // bs)) + 1
        span_k = int(np.max(d // bs - c // bs)) + 1
        for i in range(span_q):
            qb = a // bs + i
            q_lo, q_hi = np.maximum(a, qb * bs), np.minimum(b, qb * bs + bs - 1)
            for j in range(span_k):
                kb = c // bs + j
                k_lo, k_hi = np.maximum(c, kb * bs), np.minimum(d, kb * bs + bs - 1)
                piece = (q_lo <= q_hi) & (k_lo <= k_hi)
                hit = ((qb < rows) & (kb < cols)
                       & self._table[np.minimum(qb, rows - 1), np.minimum(kb, cols - 1)])
                any_ |= piece & hit & (k_lo <= q_hi)
                all_ &= ~piece | hit
        return any_, all_ & (d <= a)


@dataclasses.dataclass(frozen=True)
class AndLayout(Layout):
    """Pairs allowed by every member layout."""

    layouts: tuple[Layout, ...]
    _exact_bounds = False

    def __post_init__(self):
        _check_members("AndLayout", self.layouts)
        flat = sum(((m.layouts if isinstance(m, AndLayout) else (m,)) for m in self.layouts), ())
        object.__setattr__(self, "layouts", flat)

    def _allowed(self, q, k, xp):
        return functools.reduce(lambda x, y: x & y, (m._allowed(q, k, xp) for m in self.layouts))

    def _block_bounds(self, a, b, c, d):
        bounds = [m._block_bounds(a, b, c, d) for m in self.layouts]
        return (functools.reduce(np.logical_and, (x for x, _ in bounds)),
                functools.reduce(np.logical_and, (y for _, y in bounds)))


@dataclasses.dataclass(frozen=True)
class OrLayout(Layout):
    """Pairs allowed by any member layout."""

    layouts: tuple[Layout, ...]
    _exact_bounds = False

    def __post_init__(self):
        _check_members("OrLayout", self.layouts)
        flat = sum(((m.layouts if isinstance(m, OrLayout) else (m,)) for m in self.layouts), ())
        object.__setattr__(self, "layouts", flat)

    def _allowed(self, q, k, xp):
        return functools.reduce(lambda x, y: x | y, (m._allowed(q, k, xp) for m in self.layouts))

    def _block_bounds(self, a, b, c, d):
        bounds = [m._block_bounds(a, b, c, d) for m in self.layouts]
        return (functools.reduce(np.logical_or, (x for x, _ in bounds)),
                functools.reduce(np.logical_or, (y for _, y in bounds)))


def _check_members(owner: str, layouts) -> None:
    if not isinstance(layouts, tuple) or not layouts:
        raise ValueError(f"{owner}.layouts={layouts!r} must be a non-empty tuple of layouts")
    for m in layouts:
        if not isinstance(m, Layout):
            raise ValueError(f"{owner}.layouts has {m!r}, which is not a Layout")


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMetadata:
    """What a block-sparse kernel iterates, for one layout and one set of sizes (host numpy).

    Query block i covers rows [i*block_q, (i+1)*block_q) and key block j columns
    [j*block_k, (j+1)*block_k); the last block of each axis may be ragged. FULL means every
    in-bounds pair is allowed and the key block lies entirely inside kv_len, so the kernel may skip
    the element mask; a PARTIAL block needs the element mask (layout and key bounds). Segment ids
    and empty cache slots are not part of a layout: kernels apply them on every block.

    Attributes:
      block_state: int8 [num_q_blocks, num_kv_blocks], EMPTY / PARTIAL / FULL.
      active_kv_blocks: int32 [num_q_blocks, max_active], the non-EMPTY key blocks of each query
        block in increasing order, padded by repeating the last entry (0 for an empty row) so that
        a pipelined kernel re-fetches a block it already holds.
      active_is_full: bool [num_q_blocks, max_active], FULL flag per entry (False on padding).
      num_active: int32 [num_q_blocks], valid entries per row.
    """

    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    q_offset: int
    block_state: np.ndarray
    active_kv_blocks: np.ndarray
    active_is_full: np.ndarray
    num_active: np.ndarray

    @property
    def num_q_blocks(self) -> int:
        return self.block_state.shape[0]

    @property
    def num_kv_blocks(self) -> int:
        return self.block_state.shape[1]

    @property
    def max_active(self) -> int:
        return self.active_kv_blocks.shape[1]

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) pairs a kernel must visit."""
        return float(self.num_active.sum()) / self.block_state.size


@functools.lru_cache(maxsize=256)
def _block_metadata(layout: Layout, q_len: int, kv_len: int, block_q: int, block_k: int,
                    q_offset: int) -> BlockMetadata:
    nq, nk = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
    # Inclusive position bounds of every block, broadcast over the [nq, nk] grid.
    qi, kj = np.arange(nq, dtype=np.int64)[:, None], np.arange(nk, dtype=np.int64)[None, :]
    a = qi * block_q + q_offset
    b = np.minimum((qi + 1) * block_q, q_len) - 1 + q_offset
    c = kj * block_k
    d = np.minimum((kj + 1) * block_k, kv_len) - 1
    maybe_any, surely_all = (np.broadcast_to(x, (nq, nk)).copy()
                             for x in layout._block_bounds(a, b, c, d))
    if not layout._exact_bounds:
        _settle_densely(layout, maybe_any, surely_all, q_len, kv_len, block_q, block_k, q_offset)

    in_bounds_k = np.broadcast_to((kj + 1) * block_k <= kv_len, (nq, nk))
    state = np.where(maybe_any, np.where(surely_all & in_bounds_k, FULL, PARTIAL), EMPTY)
    state = state.astype(np.int8)

    active = state != EMPTY
    num_active = active.sum(axis=1).astype(np.int32)
    width = max(1, int(num_active.max()))
    # Stable sort puts the active blocks first, in increasing order.
    order = np.argsort(~active, axis=1, kind="stable")[:, :width].astype(np.int32)
    slot = np.arange(width)[None, :]
    last = np.take_along_axis(order, np.maximum(num_active - 1, 0)[:, None], axis=1)
    last = np.where(num_active[:, None] > 0, last, 0)
    active_kv_blocks = np.where(slot < num_active[:, None], order, last).astype(np.int32)
    active_is_full = (np.take_along_axis(state, active_kv_blocks, axis=1) == FULL) & (
        slot < num_active[:, None])

    arrays = (state, active_kv_blocks, active_is_full, num_active)
    for x in arrays:
        x.setflags(write=False)  # shared through the cache
    return BlockMetadata(q_len, kv_len, block_q, block_k, q_offset, *arrays)


def _settle_densely(layout, maybe_any, surely_all, q_len, kv_len, block_q, block_k, q_offset,
                    chunk: int = 64) -> None:
    """Evaluate the element mask on blocks whose bounds are not tight; updates in place."""
    rows, cols = np.nonzero(maybe_any & ~surely_all)
    for s in range(0, rows.size, chunk):
        r, c = rows[s:s + chunk], cols[s:s + chunk]
        q = r[:, None] * block_q + np.arange(block_q)[None, :]  # [n, block_q]
        k = c[:, None] * block_k + np.arange(block_k)[None, :]  # [n, block_k]
        valid = (q < q_len)[:, :, None] & (k < kv_len)[:, None, :]
        ok = layout._allowed((q + q_offset)[:, :, None], k[:, None, :], np)
        ok = np.broadcast_to(ok, valid.shape)
        maybe_any[r, c] = (ok & valid).any(axis=(1, 2))
        surely_all[r, c] = (ok | ~valid).all(axis=(1, 2))
