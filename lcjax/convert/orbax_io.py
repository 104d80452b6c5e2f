"""lcjax checkpoints on disk: `config.yaml` + an orbax PyTree of the variables, leaf-streamed.

Layout of a converted directory:
    DST/config.yaml    the whole `lcjax.config.Config` (`lcjax.load_config` reads it back)
    DST/variables/     orbax checkpoint of {"params": ..., "router_bias": ...}
A training run is read too (never written): RUN/config.yaml and RUN/checkpoints/<step>/state,
the TrainState whose "params" and "router_bias" subtrees are the same variables.

Leaves are written with orbax's partial save (several calls add disjoint leaves to one
checkpoint, then `finalize`) and read back one at a time with partial loading, so converting
never needs the whole model in memory. This is the only module that talks to orbax.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import pathlib
from typing import Any, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import yaml

from lcjax.config import Config
from lcjax.config_io import dump_config, load_config

CONFIG_FILE = "config.yaml"
VARIABLES_DIR = "variables"
RUN_CHECKPOINTS = "checkpoints"  # a training run: <run_dir>/checkpoints/<step>/state (lcjax.train)
TRAIN_ITEM = "state"


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


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """Where an lcjax checkpoint keeps its config and its variables.

    root: the orbax checkpoint directory; checkpointable: the item in it whose tree holds
    "params" and "router_bias" (a training checkpoint's "state", which also holds the optimizer
    state), or None for a converted directory's variables; step: the training step, or None.
    """

    config_file: pathlib.Path
    root: pathlib.Path
    checkpointable: Optional[str] = None
    step: Optional[int] = None

    def orbax_kwargs(self) -> dict:
        return {} if self.checkpointable is None else {"checkpointable_name": self.checkpointable}


def _finished_steps(checkpoints: pathlib.Path) -> list[int]:
    """Steps whose checkpoint completed (orbax renames a step's temporary directory when done)."""
    return sorted(int(p.name) for p in checkpoints.iterdir()
                  if p.name.isdigit() and (p / TRAIN_ITEM).is_dir())


def locate_checkpoint(path: str | os.PathLike) -> CheckpointSource:
    """Find the config and variables of `path`: a converted directory, a run, or one run step.

    Accepts `DST/` from `hf-to-lcjax` (config.yaml + variables/), a training run directory
    (config.yaml + checkpoints/<step>/: the newest finished step is used), or one step directory
    `<run_dir>/checkpoints/<step>` (the run's config.yaml two levels up).
    """
    path = pathlib.Path(path).absolute()
    if (path / CONFIG_FILE).is_file() and (path / VARIABLES_DIR).is_dir():
        return CheckpointSource(path / CONFIG_FILE, path / VARIABLES_DIR)
    if (path / CONFIG_FILE).is_file() and (path / RUN_CHECKPOINTS).is_dir():
        steps = _finished_steps(path / RUN_CHECKPOINTS)
        if not steps:
            raise ValueError(f"{path}: training run without a finished checkpoint (no "
                             f"{RUN_CHECKPOINTS}/<step>/{TRAIN_ITEM}/)")
        step_dir = path / RUN_CHECKPOINTS / str(steps[-1])
        return CheckpointSource(path / CONFIG_FILE, step_dir, TRAIN_ITEM, steps[-1])
    run_config = path.parent.parent / CONFIG_FILE
    if (path.name.isdigit() and path.parent.name == RUN_CHECKPOINTS and (path / TRAIN_ITEM).is_dir()
            and run_config.is_file()):
        return CheckpointSource(run_config, path, TRAIN_ITEM, int(path.name))
    raise ValueError(f"{path} is not an lcjax checkpoint: expected {CONFIG_FILE} and "
                     f"{VARIABLES_DIR}/ (written by `python -m lcjax.convert hf-to-lcjax`), or a "
                     f"training run directory ({CONFIG_FILE} and {RUN_CHECKPOINTS}/<step>/)")


def _request(metadata: Any, wanted: Sequence[tuple[str, ...]], where: Any) -> dict:
    """The partial-load request (a subtree of `metadata`) for the `wanted` key paths."""
    request: dict = {}
    for keys in wanted:
        node = metadata
        for i, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"lcjax checkpoint {where}: variable {'/'.join(keys)!r} is missing "
                                 f"(no {'/'.join(keys[:i + 1])!r})")
            node = node[key]
        nest(request, keys, node)
    return request


def load_lcjax_checkpoint(path: str | os.PathLike) -> tuple[Config, dict]:
    """(Config, variables) of a converted directory or a run's newest checkpoint (see
    `locate_checkpoint`); variables are {"params", "router_bias"} numpy arrays, all in memory."""
    source = locate_checkpoint(path)
    config = read_lcjax_config(path)
    if source.checkpointable is None:
        return config, ocp.load(source.root)
    metadata = ocp.metadata(source.root, **source.orbax_kwargs()).metadata
    context = ocp.Context()
    context.pytree.loading.partial_load = True
    collections = [(k,) for k in ("params", "router_bias") if k in metadata]
    with context:
        loaded = ocp.load(source.root, _request(metadata, collections, path), **source.orbax_kwargs())
    return config, jax.tree.map(np.asarray, loaded)


def load_lcjax_onto(path: str | os.PathLike, targets: dict) -> dict:
    """The variables of a checkpoint (see `locate_checkpoint`) restored onto `targets`: a
    {"params", "router_bias"} tree of ShapeDtypeStructs with shardings. Each leaf comes back as
    a jax Array with that sharding; each process reads only its own devices' slices."""
    source = locate_checkpoint(path)
    context = ocp.Context()
    context.pytree.loading.partial_load = True
    with context:
        return ocp.load(source.root, targets, **source.orbax_kwargs())


def read_lcjax_config(path: str | os.PathLike) -> Config:
    """The Config of a checkpoint (see `locate_checkpoint`); errors name the config.yaml."""
    config_file = locate_checkpoint(path).config_file
    try:
        return load_config(config_file)
    except yaml.YAMLError as e:
        raise ValueError(f"{config_file}: not valid YAML ({e})") from e
    except ValueError as e:
        if str(config_file) in str(e):
            raise
        raise ValueError(f"{config_file}: {e}") from e


def iter_lcjax_leaves(path: str | os.PathLike,
                      wanted: Sequence[tuple[str, ...]]) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield (keys, numpy array) for each requested leaf, loading one leaf at a time.

    Raises ValueError naming a requested leaf the checkpoint lacks.
    """
    source = locate_checkpoint(path)
    metadata = ocp.metadata(source.root, **source.orbax_kwargs()).metadata
    context = ocp.Context()
    context.pytree.loading.partial_load = True
    for keys in wanted:
        request = _request(metadata, [keys], path)
        with context:
            loaded = ocp.load(source.root, request, **source.orbax_kwargs())
        for key in keys:
            loaded = loaded[key]
        _release_freed_memory()
        yield keys, np.asarray(loaded)
        del loaded
