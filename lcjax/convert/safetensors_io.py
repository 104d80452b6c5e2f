"""Streaming safetensors I/O for HF model directories: one tensor in memory at a time.

The safetensors format is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` and the raw
little-endian tensor bytes. Reading and writing it with plain file I/O (rather than the
`safetensors` package) keeps peak memory at one tensor: tensors are read straight into the
caller's buffer (no memory map whose touched pages count toward RSS, no extra copy, bfloat16
without torch), and a shard's header is written first, from the planned layout, so its tensors
stream to disk without buffering the shard. The `safetensors` package reads these files back in
the tests, and transformers loads them.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from typing import Sequence

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_TAGS = {np.dtype(v): k for k, v in _DTYPES.items()}


def _bytes(array: np.ndarray) -> np.ndarray:
    """A uint8 view of a C-contiguous array (bfloat16 has no buffer-protocol format code)."""
    return array.reshape(-1).view(np.uint8)


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


def read_header(path: pathlib.Path) -> tuple[dict, int]:
    """(tensor entries, byte offset where the data starts) of one safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > os.path.getsize(path) - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {length})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: safetensors header ({length} bytes) is not valid JSON "
                             f"({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is a JSON {type(header).__name__}, "
                         "expected an object of tensors")
    header.pop("__metadata__", None)
    for key, info in header.items():
        _check_entry(path, key, info)
    return header, 8 + length


def _check_entry(path: pathlib.Path, key: str, info) -> None:
    """One header entry: {"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}."""
    def bad(field, value, expected):
        raise ValueError(f"{path}: tensor {key!r}: field {field!r} = {value!r} is not {expected}")

    if not isinstance(info, dict):
        bad("(entry)", info, "an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        bad("dtype", dtype, "a dtype name such as 'BF16'")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        bad("shape", shape, "a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        bad("data_offsets", offsets, "[begin, end] with 0 <= begin <= end")


def _read_weight_map(index_path: pathlib.Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index_path}: not valid JSON ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path}: field 'weight_map' = {str(weight_map)[:80]} is not an "
                         "object of tensor name -> shard file name")
    return weight_map


class ShardedReader:
    """Tensor name -> (file, shape, dtype, byte range) for one HF directory; reads on demand.

    Indexes `model.safetensors.index.json` plus every `*.safetensors` file it does not list
    (e.g. Flash-Lite's `model-auxiliary.safetensors` holding the MTP weights).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        index_path = self.directory / INDEX_FILE
        listed: dict[str, str] = {}
        if index_path.is_file():
            listed = _read_weight_map(index_path)
        files = sorted(set(listed.values()) | {p.name for p in self.directory.glob("*.safetensors")})
        if not files:
            raise ValueError(f"{self.directory}: no *.safetensors files (nor {INDEX_FILE})")
        self.entries: dict[str, tuple[str, tuple[int, ...], str, int, int]] = {}
        for name in files:
            if not (self.directory / name).is_file():
                raise ValueError(f"{index_path}: lists shard {name!r}, which does not exist")
            header, start = read_header(self.directory / name)
            for key, info in header.items():
                if key in self.entries:
                    raise ValueError(f"tensor {key!r} appears in both {self.entries[key][0]!r} "
                                     f"and {name!r}")
                begin, end = info["data_offsets"]
                self.entries[key] = (name, tuple(info["shape"]), info["dtype"], start + begin,
                                     start + end)
        for key, name in listed.items():
            if self.entries.get(key, (name,))[0] != name:
                raise ValueError(f"{index_path}: maps {key!r} to {name!r}, but it is not in that file")

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        tag = self.entries[key][2]
        if tag not in _DTYPES:
            raise ValueError(f"tensor {key!r} has dtype {tag}, which lcjax cannot convert "
                             f"(supported: {sorted(_DTYPES)})")
        return np.dtype(_DTYPES[tag])

    def read_into(self, key: str, out: np.ndarray) -> None:
        """Fill the C-contiguous `out` (the tensor's shape and dtype) from the file directly."""
        name, shape, _, begin, end = self.entries[key]
        if out.shape != shape or out.dtype != self.dtype(key) or not out.flags.c_contiguous:
            raise ValueError(f"read_into({key!r}): buffer {out.dtype}{list(out.shape)} does not "
                             f"match the tensor {self.dtype(key)}{list(shape)}")
        if end - begin != out.nbytes:
            raise ValueError(f"tensor {key!r}: {end - begin} bytes on disk, expected {out.nbytes}")
        with open(self.directory / name, "rb") as f:
            f.seek(begin)
            if f.readinto(_bytes(out)) != out.nbytes:
                raise ValueError(f"tensor {key!r}: {name} is truncated")

    def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor (its leading axis), without reading the rest."""
        name, shape, _, begin, _ = self.entries[key]
        row_bytes = math.prod(shape[1:]) * self.dtype(key).itemsize
        out = np.empty((stop - start, *shape[1:]), self.dtype(key))
        with open(self.directory / name, "rb") as f:
            f.seek(begin + start * row_bytes)
            if f.readinto(_bytes(out)) != out.nbytes:
                raise ValueError(f"tensor {key!r}: {name} is truncated")
        return out

    def get(self, key: str) -> np.ndarray:
        """The tensor `key` as a new numpy array."""
        out = np.empty(self.shape(key), self.dtype(key))
        self.read_into(key, out)
        return out


class ShardedWriter:
    """Writes tensors, in a fixed order, into shards `model-0000i-of-0000n.safetensors`.

    The order, shapes and dtypes are given up front (`layout`), so every shard's header, the file
    names and the index are known before the first byte; each tensor goes straight to disk.
    """

    def __init__(self, directory: str | os.PathLike,
                 layout: Sequence[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int):
        self.directory = pathlib.Path(directory)
        self._shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
        size = 0
        for key, shape, dtype in layout:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            if self._shards[-1] and size + nbytes > max_shard_bytes:
                self._shards.append([])
                size = 0
            self._shards[-1].append((key, tuple(shape), np.dtype(dtype)))
            size += nbytes
        n = len(self._shards)
        self._names = [SINGLE_FILE] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._total = sum(math.prod(s) * d.itemsize for shard in self._shards for _, s, d in shard)
        self._pending = iter([(i, *item) for i, shard in enumerate(self._shards) for item in shard])
        self._file = None

    def _open_shard(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, dtype in self._shards[i]:
            nbytes = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": _TAGS[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the reference writer pads the header to 8 bytes
        self._file = open(self.directory / self._names[i], "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._current = i

    def add(self, key: str, tensor: np.ndarray) -> None:
        """Write the next tensor of the layout (its shape and dtype must match the plan)."""
        i, want_key, shape, dtype = next(self._pending, (None, None, None, None))
        if key != want_key or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"tensor {key!r} {tensor.dtype}{list(tensor.shape)} written out of "
                             f"plan: expected {want_key!r} {dtype}{list(shape or ())}")
        if self._file is None or i != self._current:
            self._open_shard(i)
        self._file.write(_bytes(np.ascontiguousarray(tensor)))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Close the last shard, check every planned tensor was written, write the index."""
        missing = next(self._pending, None)
        self.close()
        if missing is not None:
            raise ValueError(f"tensor {missing[1]!r} of the planned layout was never written")
        if len(self._names) > 1:
            weight_map = {key: self._names[i] for i, shard in enumerate(self._shards)
                          for key, _, _ in shard}
            index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
