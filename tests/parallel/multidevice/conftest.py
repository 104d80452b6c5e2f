"""Tests here need 8 devices: they run in the subprocess that tests/parallel/test_multidevice.py
starts with `--xla_force_host_platform_device_count=8` (or directly on an 8-device host)."""

import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

NUM_DEVICES = 8


def pytest_collection_modifyitems(config, items):
    if jax.device_count() >= NUM_DEVICES:
        return
    skip = pytest.mark.skip(reason=f"needs {NUM_DEVICES} devices: run by tests/parallel/test_multidevice.py "
                                   "in an 8-host-device subprocess")
    here = pathlib.Path(__file__).parent
    for item in items:
        if here in item.path.parents:  # this directory only, not the runner beside it
            item.add_marker(skip)


def mesh_of(**sizes) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over the first prod(sizes) devices (axes Auto)."""
    shape = tuple(sizes.get(a, 1) for a in ("data", "fsdp", "expert", "tensor"))
    n = int(np.prod(shape))
    return Mesh(np.asarray(jax.devices()[:n]).reshape(shape), ("data", "fsdp", "expert", "tensor"))
