"""Build the (data, fsdp, expert, tensor) device mesh from MeshConfig: ICI x DCN, or abstract.

Each mesh axis has `ici * dcn` devices: the ICI part inside one slice / host group, the DCN part
across them. With any DCN size > 1 the devices are laid out by `mesh_utils.create_hybrid_device_mesh`
(grouped by `slice_index` on TPU pods, by process on GPU hosts), so only DCN-sized collectives
cross the slow network.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh

from lcjax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Total axis sizes (ICI x DCN) with the -1 axis filled; ValueError saying what to change."""
    dcn = cfg.dcn_sizes
    sizes = [s if s == -1 else s * d for s, d in zip(cfg.ici_sizes, dcn)]  # -1: ICI x DCN filled
    fixed = math.prod(s for s in sizes if s != -1)
    shown = {a: (s if d == 1 else f"{s}x{d}") for a, s, d in zip(MESH_AXES, cfg.ici_sizes, dcn)}
    if -1 in sizes:
        i = sizes.index(-1)
        if num_devices % fixed:
            raise ValueError(f"mesh sizes {shown} do not divide the {num_devices} devices: make "
                             f"the fixed axes' product divide {num_devices}")
        sizes[i] = num_devices // fixed  # this axis's ICI x DCN total
        if sizes[i] % dcn[i]:
            raise ValueError(f"mesh.{MESH_AXES[i]}=-1 leaves {sizes[i]} devices, not a multiple of "
                             f"mesh.dcn_{MESH_AXES[i]}={dcn[i]}")
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh sizes {shown} use {math.prod(sizes)} devices but {num_devices} "
                         f"are available: set one mesh axis to -1 or make the product {num_devices}")
    return tuple(sizes)


def _ici_shape(cfg: MeshConfig, total: tuple[int, ...]) -> list[int]:
    return [t // d for t, d in zip(total, cfg.dcn_sizes)]


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A Mesh over all (or the given) devices with axes MESH_AXES (ICI x DCN when dcn_* > 1)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if math.prod(cfg.dcn_sizes) > 1:
        ici = _ici_shape(cfg, shape)
        granules = {getattr(d, "slice_index", None) for d in devices}
        by_process = None in granules or len(granules) == 1
        try:
            grid = mesh_utils.create_hybrid_device_mesh(
                ici, list(cfg.dcn_sizes), devices, process_is_granule=by_process,
                allow_split_physical_axes=True)
        except ValueError as err:
            raise ValueError(f"mesh: DCN sizes {cfg.dcn_sizes} do not fit the devices' "
                             f"{'processes' if by_process else 'slices'} ({err})") from err
        return Mesh(grid, MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)  # host / virtual devices: any order is as good
    return Mesh(grid, MESH_AXES)


def abstract_mesh(cfg: MeshConfig, num_devices: int) -> AbstractMesh:
    """The mesh's shape without devices, for sharding plans of models larger than this machine."""
    return AbstractMesh(mesh_shape(cfg, num_devices), MESH_AXES)
