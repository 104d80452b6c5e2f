"""Save and load quantized trees with orbax: arrays through orbax, QTensor settings as JSON.

`directory/arrays` is an orbax PyTree checkpoint of the tree with every QTensor replaced by the
dict of its array fields; `directory/quant.json` records, per QTensor path, its static settings
(bits, granularity, group size, act mode, α, kshape, nshape) and which optional fields exist.
Loading restores the arrays and rebuilds the QTensors, so the result runs as saved.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import flax.core
import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from lcjax.quant.quantizers import QTensor

FORMAT = "lcjax.quant/1"
_META = "quant.json"
_ARRAYS = "arrays"
_STATIC = ("bits", "granularity", "group_size", "act", "alpha", "kshape", "nshape")
_ARRAY_FIELDS = ("q", "scale", "zero", "channel_scale", "smooth", "act_scale")
_SEP = "/"


def _split(tree: Any) -> tuple[dict, dict]:
    flat = traverse_util.flatten_dict(flax.core.unfreeze(tree), sep=_SEP)
    plain, meta = {}, {}
    for path, leaf in flat.items():
        if isinstance(leaf, QTensor):
            fields = {f: getattr(leaf, f) for f in _ARRAY_FIELDS if getattr(leaf, f) is not None}
            for f, value in fields.items():
                plain[f"{path}{_SEP}{f}"] = value
            meta[path] = {**{f: getattr(leaf, f) for f in _STATIC}, "fields": sorted(fields)}
        else:
            plain[path] = leaf
    return traverse_util.unflatten_dict(plain, sep=_SEP), meta


def save_quantized(directory: str | os.PathLike, tree: Any, *, recipe: str = "") -> None:
    """Write a (quantized) params or variables tree to a new `directory`."""
    directory = pathlib.Path(directory).absolute()
    if directory.exists():
        raise ValueError(f"{directory} exists: save_quantized writes a new directory")
    plain, meta = _split(tree)
    directory.mkdir(parents=True)
    with ocp.PyTreeCheckpointer() as ckpt:
        ckpt.save(directory / _ARRAYS, jax.device_get(plain))
    (directory / _META).write_text(json.dumps({"format": FORMAT, "recipe": recipe,
                                               "qtensors": meta}, indent=1))


def load_quantized(directory: str | os.PathLike) -> Any:
    """The tree written by save_quantized, QTensors rebuilt (arrays as jax arrays)."""
    directory = pathlib.Path(directory).absolute()
    if not (directory / _META).is_file():
        raise ValueError(f"{directory} is not a quantized checkpoint ({_META} is missing)")
    info = json.loads((directory / _META).read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{directory / _META}: format {info.get('format')!r}, expected {FORMAT!r}")
    with ocp.PyTreeCheckpointer() as ckpt:
        plain = ckpt.restore(directory / _ARRAYS)
    flat = traverse_util.flatten_dict(plain, sep=_SEP)
    flat = {k: jax.numpy.asarray(v) for k, v in flat.items()}
    for path, meta in info["qtensors"].items():
        arrays = {f: flat.pop(f"{path}{_SEP}{f}") for f in meta["fields"]}
        static = {f: meta[f] for f in _STATIC}
        static["kshape"], static["nshape"] = tuple(static["kshape"]), tuple(static["nshape"])
        flat[path] = QTensor(**arrays, **static)
    return traverse_util.unflatten_dict(flat, sep=_SEP)


__all__ = ["load_quantized", "save_quantized"]
