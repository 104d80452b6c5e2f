"""Device meshes and the logical-axis rules that map parameter / activation names onto them."""

from lcjax.parallel.distributed import initialize, is_primary
from lcjax.parallel.context import Parallelism, current, use_parallelism
from lcjax.parallel.mesh import MESH_AXES, abstract_mesh, make_mesh
from lcjax.parallel.rules import (LOGICAL_AXIS_RULES, cache_shardings, load_rules,
                                  logical_shardings, resolve_spec, resolve_specs, rules_for,
                                  shard_bytes)

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "Parallelism", "abstract_mesh", "cache_shardings",
           "current", "load_rules", "resolve_spec", "resolve_specs", "rules_for", "shard_bytes",
           "use_parallelism", "initialize", "is_primary", "logical_shardings",
           "make_mesh"]

# Flash Communication quantized all-reduce and the HLO byte counter its benchmarks use.
from lcjax.parallel.collectives import dequantize_groups, quantize_groups, quantized_all_reduce
from lcjax.parallel.hlo_bytes import collective_bytes, collective_ops

__all__ += ["collective_bytes", "collective_ops", "dequantize_groups", "quantize_groups",
            "quantized_all_reduce"]
