"""lcjax checkpoints on disk: `config.yaml` + an orbax PyTree of the variables, leaf-streamed.

Layout of a converted directory:
    DST/config.yaml    the whole `lcjax.config.Config` (`lcjax.load_config` reads it back)
    DST/variables/     orbax checkpoint of {"params": ..., "router_bias": ...}

Leaves are written with orbax's partial save (several calls add disjoint leaves to one
checkpoint, then `finalize`) and read back one at a time with partial loading, so converting
never needs the whole model in memory. This is the only module that talks to orbax.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from lcjax.config import Config
from lcjax.config_io import dump_config, load_config

CONFIG_FILE = "config.yaml"
VARIABLES_DIR = "variables"


def nest(tree: dict, keys: Sequence[str], value: Any) -> None:
    """tree[k0][k1]...[kn] = value, creating the dicts on the way."""
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps tensorstore's buffers in its arenas)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _save(target: pathlib.Path, tree: dict) -> None:
    """Add `tree`'s leaves to the partial checkpoint at `target`, without orbax's host copy."""
    context = ocp.Context()
    # The arrays are not modified while saving (the call blocks), so orbax need not copy them.
    context.memory.deepcopy_host_arrays = False
    with context:
        ocp.partial.save(target, tree)
    _release_freed_memory()


def write_lcjax_checkpoint(directory: str | os.PathLike, config: Config,
                           leaves: Iterable[tuple[tuple[str, ...], np.ndarray]],
                           chunk_bytes: int = 1 << 30) -> None:
    """Write `config` and the (keys, array) leaves into `directory` (which must be empty).

    Small leaves are grouped into writes of up to `chunk_bytes`; a leaf that does not fit is
    written after the pending group, and one larger than `chunk_bytes` alone, at once. So at
    most max(chunk_bytes, largest leaf) waits in memory, plus tensorstore's write buffer.
    """
    directory = pathlib.Path(directory).absolute()  # orbax requires absolute paths
    dump_config(config, directory / CONFIG_FILE)
    target = directory / VARIABLES_DIR
    buffer: dict = {}
    size = 0
    for keys, array in leaves:
        if buffer and size + array.nbytes > chunk_bytes:
            _save(target, buffer)
            buffer, size = {}, 0
        nest(buffer, keys, array)
        size += array.nbytes
        if size >= chunk_bytes:  # a full group, or one large leaf: write before building more
            _save(target, buffer)
            buffer, size = {}, 0
        del array  # otherwise the loop variable keeps it alive while the next leaf is built
    if buffer:
        _save(target, buffer)
    ocp.partial.finalize(target)


def _require_checkpoint(path: pathlib.Path) -> None:
    if not (path / CONFIG_FILE).is_file() or not (path / VARIABLES_DIR).is_dir():
        raise ValueError(f"{path} is not an lcjax checkpoint: expected {CONFIG_FILE} and "
                         f"{VARIABLES_DIR}/ (written by `python -m lcjax.convert hf-to-lcjax`)")


def load_lcjax_checkpoint(path: str | os.PathLike) -> tuple[Config, dict]:
    """(Config, variables) of a converted directory; variables are numpy arrays, all in memory."""
    path = pathlib.Path(path).absolute()
    _require_checkpoint(path)
    return load_config(path / CONFIG_FILE), ocp.load(path / VARIABLES_DIR)


def read_lcjax_config(path: str | os.PathLike) -> Config:
    path = pathlib.Path(path)
    _require_checkpoint(path)
    return load_config(path / CONFIG_FILE)


def iter_lcjax_leaves(path: str | os.PathLike,
                      wanted: Sequence[tuple[str, ...]]) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield (keys, numpy array) for each requested leaf, loading one leaf at a time.

    Raises ValueError naming a requested leaf the checkpoint lacks.
    """
    root = pathlib.Path(path).absolute() / VARIABLES_DIR
    metadata = ocp.metadata(root).metadata
    context = ocp.Context()
    context.pytree.loading.partial_load = True
    for keys in wanted:
        node = metadata
        for i, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"lcjax checkpoint {path}: variable {'/'.join(keys)!r} is missing "
                                 f"(no {'/'.join(keys[:i + 1])!r})")
            node = node[key]
        request: dict = {}
        nest(request, keys, node)
        with context:
            loaded = ocp.load(root, request)
        for key in keys:
            loaded = loaded[key]
        _release_freed_memory()
        yield keys, np.asarray(loaded)
        del loaded
