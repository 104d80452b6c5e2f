"""The active parallelism (mesh, rule table, ParallelConfig) that model code may consult.

Like flax's `logical_axis_rules`, it is a context, read at trace time: `use_parallelism(mesh,
config.parallel)` around `jax.jit` tracing. Outside it (one device, tests, serving) `current()` is
None and the model runs plain code. This is the one place that lists what it changes; the model
reads it in exactly two spots, each pointing back here:

- lcjax/model/moe.py `MoE._expert_parallel_plan`: with `parallel.expert_dispatch` "auto" (when
  the mesh's `expert` axis > 1, the rules put `experts` on it and the batch rows split over it)
  or "all_to_all" (required; else ValueError), the routed experts run through
  lcjax.parallel.expert_parallel: tokens are dispatched to the devices holding their experts by
  all-to-all. The result equals the GSPMD path up to summation order, except that
  `parallel.expert_capacity_factor` > 0 drops slots over each device pair's cap. "gspmd" (or no
  context) keeps the single-program path. Planned expert parallelism with quantized expert
  weights is a ValueError (serve them with "gspmd").
- lcjax/model/layers.py `linear(..., row_parallel=...)` (attention o_proj, dense MLP down
  projections): with `parallel.quantized_tp_comm` != "none" and the contracted dim split over
  exactly one mesh axis of size > 1, the tensor-parallel all-reduce runs quantized (Flash
  Communication, lcjax.parallel.tensor_parallel): the output changes by the quantization error
  of the reduction. Float weights only.

Nothing else in the model depends on it; sharding itself comes from the logical axis names
(nn.with_logical_partitioning / with_logical_constraint) and the rules this context enters.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator, Optional, Sequence

import flax.linen as nn
from jax.sharding import Mesh, PartitionSpec

from lcjax.config import ParallelConfig
from lcjax.parallel.rules import Rules, axis_tuple, load_rules, resolve_spec


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """A concrete mesh with its rules and settings; helpers answer "how is this split here?"."""

    mesh: Mesh
    rules: Rules
    config: ParallelConfig

    @property
    def axis_sizes(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    def spec(self, shape: Sequence[int], logical: Sequence[Optional[str]]) -> PartitionSpec:
        """Mesh PartitionSpec of an array by its logical names (rules + divisibility)."""
        return resolve_spec(shape, logical, self.axis_sizes, self.rules)

    def dim_axes(self, shape: Sequence[int], logical: Sequence[Optional[str]]) -> list[tuple[str, ...]]:
        """Per dim of an array, the mesh axes it is split over (empty tuple: not split)."""
        spec = tuple(self.spec(shape, logical))
        spec += (None,) * (len(shape) - len(spec))
        return [axis_tuple(p) for p in spec]


_CURRENT: contextvars.ContextVar[Optional[Parallelism]] = contextvars.ContextVar(
    "lcjax_parallelism", default=None)


def current() -> Optional[Parallelism]:
    """The Parallelism set by the innermost `use_parallelism`, or None."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_parallelism(mesh: Mesh, config: Optional[ParallelConfig] = None,
                    rules: Optional[Rules] = None) -> Iterator[Parallelism]:
    """Enter `mesh` and its logical axis rules, and expose them to model code while tracing."""
    config = ParallelConfig() if config is None else config
    rules = load_rules(config.rules) if rules is None else rules
    par = Parallelism(mesh=mesh, rules=rules, config=config)
    token = _CURRENT.set(par)
    try:
        with mesh, nn.logical_axis_rules(rules):
            yield par
    finally:
        _CURRENT.reset(token)
