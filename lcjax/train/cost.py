"""FLOPs a train step executes, from XLA's cost analysis, against the useful model FLOPs.

XLA counts a while-loop body once, whatever its trip count. The step is therefore compiled with
its layers unrolled (`scan_layers=false`, the same math), and the grouped matmul's loop form
(pallas_kernels/grouped_matmul/segments.py, the CPU default at training shapes) reports each
loop's run-time trip count through a debug callback: executed = XLA's count + (trips - 1) x one
tile's matmul FLOPs per loop. Tiles of rows routed to zero experts are never visited, so they
count neither as executed nor as useful.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re

import jax
import numpy as np

from lcjax.config import Config
from lcjax.parallel import make_mesh, use_parallelism
from lcjax.train.flops import train_flops_per_token
from lcjax.train.state import create_optimizer, init_state
from lcjax.train.step import train_step
from pallas_kernels.grouped_matmul import segments


@contextlib.contextmanager
def _count_loop_trips(records: list):
    """Within the block, each segments loop appends (trips, FLOPs of one trip's matmul)."""
    gmm_loop, tgmm_loop = segments._gmm_loop, segments._tgmm_loop

    def report(lhs, group_sizes, tile_rows: int, matmul_flops: int):
        t = min(tile_rows, lhs.shape[0])
        trips = segments._windows(group_sizes, lhs.shape[0], t)[3]
        jax.debug.callback(lambda n: records.append((int(n), matmul_flops * t)), trips)

    def counted_gmm(lhs, rhs, group_sizes, tile_rows, transpose_rhs, out_dtype):
        n_dim = rhs.shape[1 if transpose_rhs else 2]
        report(lhs, group_sizes, tile_rows, 2 * lhs.shape[1] * n_dim)
        return gmm_loop(lhs, rhs, group_sizes, tile_rows, transpose_rhs, out_dtype)

    def counted_tgmm(lhs, rhs, group_sizes, tile_rows, out_dtype):
        report(lhs, group_sizes, tile_rows, 2 * lhs.shape[1] * rhs.shape[1])
        return tgmm_loop(lhs, rhs, group_sizes, tile_rows, out_dtype)

    segments._gmm_loop, segments._tgmm_loop = counted_gmm, counted_tgmm
    try:
        yield
    finally:
        segments._gmm_loop, segments._tgmm_loop = gmm_loop, tgmm_loop


def train_step_cost(config: Config, batch: dict) -> dict:
    """Executed and useful FLOPs per token of one train step of `config` on `batch` (arrays
    [B, S] as the data pipeline yields them), on config.mesh (one device by default)."""
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, scan_layers=False))
    mesh = make_mesh(config.mesh)
    tx = create_optimizer(config)
    state = init_state(config, tx, mesh)
    records: list = []
    with use_parallelism(mesh, config.parallel):
        step = jax.jit(functools.partial(train_step, config=config, tx=tx))
        compiled = step.lower(state, batch).compile()
        with _count_loop_trips(records):
            counting = jax.jit(functools.partial(train_step, config=config, tx=tx))
            _, metrics = counting(state, batch)
            zero_share = float(jax.device_get(metrics["zero_share"]))
            jax.effects_barrier()
    counted = float(compiled.cost_analysis()["flops"])
    loops_in_hlo = len(re.findall(r"\bwhile\(", compiled.as_text()))
    executed = counted + sum((trips - 1) * flops for trips, flops in records)
    tokens = int(np.prod(batch["inputs"].shape))
    useful = train_flops_per_token(config.model, batch["inputs"].shape[1], zero_share)
    return {"zero_share": zero_share, "xla_counted_flops": counted, "grouped_matmul_loops":
            len(records), "while_loops_in_hlo": loops_in_hlo,
            "executed_flops_per_token": executed / tokens, "useful_flops_per_token": useful,
            "useful_fraction": useful * tokens / executed}
