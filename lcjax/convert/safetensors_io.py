"""Streaming safetensors I/O for HF model directories: one tensor in, one shard out at a time.

`ShardedReader` indexes a directory (`model.safetensors.index.json` plus any `*.safetensors` the
index does not list, e.g. Flash-Lite's `model-auxiliary.safetensors`) from file headers only and
reads tensors one by one; files are opened per `session()` so their memory maps (which count
toward RSS once touched) are released after each lcjax leaf. `ShardedWriter` packs tensors into
shards of at most `max_shard_bytes` in a precomputed order, so only one shard is ever buffered.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Iterator, Optional, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype tag -> numpy dtype; BF16 via ml_dtypes (numpy has none).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a HF-style string ("5GB", "200MB", "64KiB")."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


class ShardedReader:
    """Tensor name -> (file, shape, dtype) for one HF directory; reads one tensor at a time."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        index_path = self.directory / INDEX_FILE
        listed: dict[str, str] = {}
        if index_path.is_file():
            listed = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(listed.values()) | {p.name for p in self.directory.glob("*.safetensors")})
        if not files:
            raise ValueError(f"{self.directory}: no *.safetensors files (nor {INDEX_FILE})")
        self.entries: dict[str, tuple[str, tuple[int, ...], str]] = {}
        for name in files:
            if not (self.directory / name).is_file():
                raise ValueError(f"{index_path}: lists shard {name!r}, which does not exist")
            with safe_open(self.directory / name, "np") as f:
                for key in f.keys():
                    if key in self.entries:
                        raise ValueError(f"tensor {key!r} appears in both {self.entries[key][0]!r} "
                                         f"and {name!r}")
                    view = f.get_slice(key)
                    self.entries[key] = (name, tuple(view.get_shape()), view.get_dtype())
        for key, name in listed.items():
            if self.entries.get(key, (name,))[0] != name:
                raise ValueError(f"{index_path}: maps {key!r} to {name!r}, but it is not in that file")
        self._open: Optional[dict] = None
        self._stack: Optional[contextlib.ExitStack] = None

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    @contextlib.contextmanager
    def session(self) -> Iterator["ShardedReader"]:
        """Keep the files opened by `get` open until the block ends, then unmap them."""
        with contextlib.ExitStack() as stack:
            self._open, self._stack = {}, stack
            try:
                yield self
            finally:
                self._open = None

    def get(self, key: str) -> np.ndarray:
        """The tensor `key` as a numpy array (a copy, never a view of the file's memory map)."""
        name, _, dtype = self.entries[key]
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {key!r} has dtype {dtype}, which lcjax cannot convert "
                             f"(supported: {sorted(_DTYPES)})")
        # numpy's safetensors backend has no bfloat16: read those through the flax (jax) backend.
        framework = "flax" if dtype == "BF16" else "np"
        if self._open is None:
            with safe_open(self.directory / name, framework) as f:
                return np.asarray(f.get_tensor(key))
        if (name, framework) not in self._open:
            self._open[(name, framework)] = self._stack.enter_context(
                safe_open(self.directory / name, framework))
        return np.asarray(self._open[(name, framework)].get_tensor(key))


class ShardedWriter:
    """Writes tensors, in a fixed order, into shards `model-0000i-of-0000n.safetensors`.

    The order and sizes are given up front (`layout`), so shard names and the index are known
    before the first byte is written and only the current shard is buffered.
    """

    def __init__(self, directory: str | os.PathLike, layout: Sequence[tuple[str, int]],
                 max_shard_bytes: int):
        self.directory = pathlib.Path(directory)
        shards: list[list[str]] = [[]]
        size = 0
        for key, nbytes in layout:
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(key)
            size += nbytes
        n = len(shards)
        names = [SINGLE_FILE] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._file_of = {key: names[i] for i, keys in enumerate(shards) for key in keys}
        self._last_of = {keys[-1]: names[i] for i, keys in enumerate(shards) if keys}
        self._total = sum(nbytes for _, nbytes in layout)
        self._order = iter([key for key, _ in layout])
        self._buffer: dict[str, np.ndarray] = {}

    def add(self, key: str, tensor: np.ndarray) -> None:
        """Buffer the next tensor of the layout; write its shard when it is the shard's last."""
        expected = next(self._order, None)
        if key != expected:
            raise ValueError(f"tensor {key!r} written out of order: expected {expected!r}")
        self._buffer[key] = tensor
        if key in self._last_of:
            save_file(self._buffer, str(self.directory / self._last_of[key]),
                      metadata={"format": "pt"})
            self._buffer = {}

    def finish(self) -> None:
        """Check every planned tensor was written; write the index for a multi-file checkpoint."""
        missing = next(self._order, None)
        if missing is not None:
            raise ValueError(f"tensor {missing!r} of the planned layout was never written")
        if len(set(self._file_of.values())) > 1:
            index = {"metadata": {"total_size": self._total}, "weight_map": self._file_of}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
