"""Device meshes and the logical-axis rules that map parameter / activation names onto them."""

from lcjax.parallel.mesh import MESH_AXES, make_mesh
from lcjax.parallel.rules import LOGICAL_AXIS_RULES, logical_shardings

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "logical_shardings", "make_mesh"]
