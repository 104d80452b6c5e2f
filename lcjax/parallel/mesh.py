"""Build the (data, fsdp, expert, tensor) device mesh from MeshConfig."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from lcjax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Axis sizes with the -1 axis filled; ValueError saying what to change if they don't fit."""
    sizes = [getattr(cfg, axis) for axis in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the "
                             f"{num_devices} devices: make the fixed axes' product divide {num_devices}")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} use {math.prod(sizes)} devices "
                         f"but {num_devices} are available: set one mesh axis to -1 or make the "
                         f"product {num_devices}")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A Mesh over all (or the given) devices with axes MESH_AXES."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
