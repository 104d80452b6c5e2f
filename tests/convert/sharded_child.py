"""8-device checks of sharded loading and of the serving memory plan, run as a child process.

Started by tests/convert/test_sharded_load.py with XLA_FLAGS=--xla_force_host_platform_device_count=8
(XLA fixes the CPU device count at start-up). Asserts; prints one JSON line of measurements.
Usage: python tests/convert/sharded_child.py WORK_DIR [key=value overrides of the tiny config]
"""

import gc
import json
import pathlib
import sys
import time
import tracemalloc

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lcjax.config import MeshConfig
from lcjax.config_io import load_config, resolve_config_path
from lcjax.convert import hf_to_lcjax, load_hf_checkpoint, save_hf_checkpoint
from lcjax.convert.safetensors_io import ShardedReader
from lcjax.convert.sharded_load import load_hf_sharded, load_lcjax_sharded, rule_shardings
from lcjax.parallel.mesh import make_mesh
from lcjax.parallel.rules import resolve_spec, rules_for
from lcjax.quant.abstract import abstract_quantize
from lcjax.quant.apply import quantize_model
from lcjax.serve.loading import random_model
from lcjax.serve.plan import logical_variables, memory_plan

MESH = MeshConfig(data=1, expert=4, tensor=2)


def rss_kib(field: str = "VmRSS") -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def device0_bytes(tree) -> int:
    """Bytes the first device holds of a tree of global arrays."""
    first = jax.devices()[0]
    return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards
               if s.device == first)


def check_equal(got, ref, shardings, what: str) -> None:
    for (path, a), b, s in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref),
                               jax.tree.leaves(shardings)):
        name = jax.tree_util.keystr(path)
        assert a.sharding == s, f"{what} {name}: sharding {a.sharding} != requested {s}"
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b), f"{what} {name}: values differ"


def main(work: pathlib.Path, overrides: list[str]) -> dict:
    assert len(jax.devices()) == 8, jax.devices()
    config, variables, _ = random_model(load_config([resolve_config_path("tiny")], overrides))
    hf_dir = work / "hf"
    save_hf_checkpoint(variables, config, hf_dir, max_shard_size="40KB", zero_expert_stubs=False)
    reader = ShardedReader(hf_dir)
    files = {e[0] for e in reader.entries.values()}
    assert len(files) >= 2, files
    sizes = [e[4] - e[3] for e in reader.entries.values()]
    _, ref = load_hf_checkpoint(hf_dir, config)
    mesh = make_mesh(MESH)
    shardings = rule_shardings(config, mesh)

    gc.collect()
    rss0 = rss_kib()
    tracemalloc.start()
    start = time.perf_counter()
    _, got = load_hf_sharded(hf_dir, shardings, config)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth = (rss_kib() - rss0) * 1024
    check_equal(got, ref, shardings, "hf")

    # the memory plan of the same mesh: per-device bytes of the arrays just placed
    plan = memory_plan(config, MESH, 8)
    assert plan.param_bytes == device0_bytes(got), (plan.param_bytes, device0_bytes(got))
    recipe = "w4a16:group_size=8"
    qparams = quantize_model(ref["params"], config, recipe)
    qplan = memory_plan(config, MESH, 8, recipe)
    abs_vars, logical = logical_variables(config.model)  # the logical specs the plan used
    qabs, qlogical = abstract_quantize(abs_vars["params"], logical["params"], config, recipe)
    rules, axis_sizes = rules_for(config), dict(mesh.shape)
    qshard = jax.tree.map(lambda a, s: NamedSharding(mesh, resolve_spec(a.shape, tuple(s), axis_sizes, rules)),
                          qabs, qlogical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    placed = jax.device_put({"params": qparams, "router_bias": ref["router_bias"]},
                            {"params": qshard, "router_bias": shardings["router_bias"]})
    assert qplan.param_bytes == device0_bytes(placed), (qplan.param_bytes, device0_bytes(placed))

    # orbax: a converted directory restored onto the same shardings
    hf_to_lcjax(hf_dir, work / "lcjax", config)
    _, restored = load_lcjax_sharded(work / "lcjax", shardings)
    check_equal(restored, ref, shardings, "orbax")
    return {"tensors": len(sizes), "files": len(files), "largest_tensor": max(sizes),
            "largest_leaf": max(a.nbytes for a in jax.tree.leaves(ref)), "total": sum(sizes),
            "host_peak_tracemalloc": peak, "rss_growth": rss_growth, "load_seconds": round(seconds, 3),
            "plan_param_bytes_per_device": plan.param_bytes,
            "plan_w4a16_bytes_per_device": qplan.param_bytes}


if __name__ == "__main__":
    print(json.dumps(main(pathlib.Path(sys.argv[1]), sys.argv[2:])))
