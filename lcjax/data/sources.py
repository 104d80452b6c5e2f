"""Document sources: random-access lists of text documents, and the held-out split rules.

Every source is a grain `RandomAccessDataSource` (`__len__` + `__getitem__` -> str), picklable
so grain worker processes can open it again. Files are found once, sorted, and read lazily.

Split rules (fixed, so held-out losses stay comparable across runs and machines):
- stdlib: file `rel` (its path relative to the stdlib root, '/'-separated) is held out when
  crc32(rel) / 2**32 < heldout_fraction. Adding or removing files never moves other files.
- other sources: document `i` (its index in the sorted files, records in file order) is held out
  when splitmix64(i) / 2**64 < heldout_fraction.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import pathlib
import sysconfig
import threading
import zlib
from typing import Sequence

import grain
import numpy as np

from lcjax.data.spec import SPLITS, DataSpec, check

STDLIB_HELDOUT_FRACTION = 0.02
# Not part of the corpus: installed third-party packages, and the stdlib's own test suites
# (deliberately odd files: bad encodings, huge generated data; and Debian-style installs ship
# them separately, so leaving them out keeps the corpus the same across installs).
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_SCAN_CHUNK = 1 << 24
# Up-front validation of JSONL / Parquet files (documented in lcjax.config.DataConfig): each file's
# first SCAN_RECORDS records or SCAN_BYTES bytes are parsed when the source opens.
SCAN_RECORDS = 100_000
SCAN_BYTES = 256 << 20
_log = logging.getLogger("lcjax.data")


# ---------------------------------------------------------------- split rules


def path_is_heldout(rel: str, fraction: float) -> bool:
    """The stdlib rule: crc32 of the '/'-separated relative path below `fraction` of 2**32."""
    return zlib.crc32(rel.encode("utf-8")) < fraction * 2**32


def heldout_mask(num_docs: int, fraction: float) -> np.ndarray:
    """The index rule: bool [num_docs], True where splitmix64(index) / 2**64 < fraction."""
    z = np.arange(num_docs, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # wraps mod 2**64
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) < fraction * 2.0**53


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: expected one of {list(SPLITS)}")


# ---------------------------------------------------------------- the stdlib corpus


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(split: str, heldout_fraction: float = STDLIB_HELDOUT_FRACTION) -> list[pathlib.Path]:
    """The standard library's .py files of `split` ("train" | "heldout"), sorted by relative path.

    Excludes STDLIB_EXCLUDED_DIRS at any depth. On CPython 3.11 that is ~730 files, ~12 MB.
    """
    _check_split(split)
    root = stdlib_root()
    rels = _stdlib_files(str(root))
    if not rels:
        raise ValueError(f"no Python standard library sources (*.py) under {root}: this Python ships "
                         "without them; set data.source to text/jsonl/parquet/arrayrecord and data.path")
    want = split == "heldout"
    return [root / rel for rel in rels if path_is_heldout(rel, heldout_fraction) == want]


@functools.lru_cache(maxsize=None)
def _stdlib_files(root: str) -> tuple[str, ...]:
    """Sorted '/'-separated relative paths of the .py files, never entering excluded dirs."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                rels.append(pathlib.PurePath(rel_dir, name).as_posix().removeprefix("./"))
    return tuple(sorted(rels))


# ---------------------------------------------------------------- sources


class TextFiles(grain.sources.RandomAccessDataSource):
    """One document per file, decoded as utf-8 (undecodable bytes become U+FFFD)."""

    def __init__(self, paths: Sequence[os.PathLike | str]):
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        with open(self.paths[index], "rb") as f:
            return f.read().decode("utf-8", errors="replace")


class JsonlFiles(grain.sources.RandomAccessDataSource):
    """One JSON object per non-empty line; the document is `record[text_field]`.

    Opening scans each file once for line offsets (24 bytes per line in memory) and parses its
    first SCAN_RECORDS records / SCAN_BYTES, so a malformed line there fails before training
    starts, as `ValueError("<file>:<line>: <what is wrong>")`. Later records are parsed on access
    and fail the same way. With `skip_bad_records`, a bad record is an empty document instead
    (dropped by the packer), and each file's count of bad records in the scan is logged once.
    """

    # Subclasses read other record layouts (lcjax.data.chat.ChatFiles): `parse_record(raw line,
    # path, line, text_field)` -> the document or ValueError "<path>:<line>: ...", a module-level
    # function (it is part of the scan cache's key); None reads `record[text_field]`. `empty`
    # stands in for a skipped record.
    parse_record = None
    empty: object = ""

    def __init__(self, paths: Sequence[os.PathLike | str], text_field: str,
                 skip_bad_records: bool = False):
        self.paths = [str(p) for p in paths]
        self.text_field = text_field
        self.skip_bad_records = skip_bad_records
        index = [_line_index(p) for p in self.paths]
        self._file = np.concatenate([np.full(len(s), i, np.int32) for i, (s, _, _) in enumerate(index)])
        self._start, self._end, self._line = (np.concatenate([x[k] for x in index]) for k in range(3))
        self._bad = [_scan_jsonl(p, *_file_key(p), text_field, skip_bad_records, SCAN_RECORDS,
                                 SCAN_BYTES, self._parser()) for p in self.paths]

    @classmethod
    def _parser(cls):
        return cls.parse_record or _jsonl_text

    def __len__(self) -> int:
        return len(self._start)

    def __getitem__(self, index: int) -> str | dict:
        file = int(self._file[index])
        path, line = self.paths[file], int(self._line[index])
        if line in self._bad[file]:
            return self.empty
        start, end = int(self._start[index]), int(self._end[index])
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        try:
            return self._parser()(raw, path, line, self.text_field)
        except ValueError as e:  # past the up-front scan
            if not self.skip_bad_records:
                raise
            _note_late_skip(path, str(e))
            return self.empty


def json_record(raw: bytes, path: str, line: int, field: str) -> dict:
    """One JSONL line as a dict holding `field`; ValueError `<path>:<line>: ...` otherwise."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}:{line}: not a JSON object ({e})") from e
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}:{line}: no field {field!r} (has {keys}); set data.text_field")
    return record


def _jsonl_text(raw: bytes, path: str, line: int, text_field: str) -> str:
    """The document of one JSONL line; ValueError `<path>:<line>: ...` when it is malformed."""
    if not raw.strip():
        return ""
    record = json_record(raw, path, line, text_field)
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{path}:{line}: field {text_field!r} is "
                         f"{type(text).__name__}, expected a string")
    return text


def _file_key(path: str) -> tuple[int, int]:
    """(size, mtime) so a scan is cached per version of a file."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4096)
def _scan_jsonl(path: str, size: int, mtime_ns: int, text_field: str, skip: bool,
                max_records: int, max_bytes: int, parse=None) -> frozenset[int]:
    """Parse the first records of a JSONL file: raise on the first bad one, or (skip) return the
    line numbers of the bad ones and log their count once (cached per file version)."""
    parse = parse or _jsonl_text
    bad, first, records, nbytes = [], "", 0, 0
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            if records >= max_records or nbytes >= max_bytes:
                break
            nbytes += len(raw)
            if not raw.strip():
                continue
            records += 1
            try:
                parse(raw, path, line, text_field)
            except ValueError as e:
                if not skip:
                    raise
                bad.append(line)
                first = first or str(e)
    _log_skipped(path, len(bad), records, first)
    return frozenset(bad)


def _log_skipped(path: str, count: int, scanned: int, first: str) -> None:
    if count:
        _log.warning("data: %s: skipped %d bad record(s) of the first %d (data.skip_bad_records); "
                     "first: %s", path, count, scanned, first)


_late_skips: set[str] = set()


def _note_late_skip(path: str, error: str) -> None:
    """A bad record past the up-front scan, skipped: logged for the first one per file."""
    if path not in _late_skips:
        _late_skips.add(path)
        _log.warning("data: %s: skipping a bad record past the up-front scan (data.skip_bad_records; "
                      "later ones in this file are skipped silently): %s", path, error)


def _line_index(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, 1-based line number) of every non-empty line, without holding the file."""
    newlines, base = [], 0
    with open(path, "rb") as f:
        while chunk := f.read(_SCAN_CHUNK):
            newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n")) + base)
            base += len(chunk)
    nl = np.concatenate(newlines or [np.zeros(0, np.int64)]).astype(np.int64)
    start = np.concatenate([[0], nl + 1]).astype(np.int64)
    end = np.concatenate([nl, [base]]).astype(np.int64)
    line = np.arange(1, len(start) + 1, dtype=np.int64)
    keep = end > start
    return start[keep], end[keep], line[keep]


class ParquetFiles(grain.sources.RandomAccessDataSource):
    """One document per row of a string (or utf-8 binary) column; nulls are empty documents.

    Row counts come from file footers; opening checks each footer and the column's type, and
    reads the first SCAN_RECORDS rows / SCAN_BYTES of the column, so a corrupt file or row fails
    before training starts with a ValueError naming file, row (0-based) and column. A file's
    column is read into memory on first access (per process), one row group at a time, so the
    text of all files must fit in RAM; use ArrayRecord beyond that. With `skip_bad_records`, a
    bad row (or every row of an unreadable row group) is an empty document instead.
    """

    def __init__(self, paths: Sequence[os.PathLike | str], column: str,
                 skip_bad_records: bool = False):
        self.paths = [str(p) for p in paths]
        self.column = column
        self.skip_bad_records = skip_bad_records
        counts, self._groups, self._bad = [], [], []
        for path in self.paths:
            meta = _open_parquet(path)
            names = meta.schema_arrow.names
            if column not in names:
                raise ValueError(f"{path}: no column {column!r} (has {names}); set data.text_field")
            kind = meta.schema_arrow.field(column).type
            if not _is_text_type(kind):
                raise ValueError(f"{path}: column {column!r} has type {kind}, expected strings "
                                 "(string or utf-8 binary); set data.text_field")
            sizes = [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
            counts.append(meta.metadata.num_rows)
            self._groups.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
            self._bad.append(_scan_parquet(path, *_file_key(path), column, skip_bad_records,
                                           SCAN_RECORDS, SCAN_BYTES))
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._cache: dict[int, list] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> str:
        file = int(np.searchsorted(self._offsets, index, side="right")) - 1
        row = index - int(self._offsets[file])
        if row in self._bad[file]:
            return ""
        groups = self._groups[file]
        group = int(np.searchsorted(groups, row, side="right")) - 1
        try:
            _, chunk = self._column(file)[group]
            if isinstance(chunk, ValueError):
                raise chunk
            return _parquet_text(chunk[row - int(groups[group])].as_py(), self.paths[file], row,
                                 self.column)
        except ValueError as e:
            if not self.skip_bad_records:
                raise
            _note_late_skip(self.paths[file], str(e))
            return ""

    def _column(self, file: int) -> list:
        with self._lock:
            if file not in self._cache:
                self._cache[file] = _read_row_groups(self.paths[file], self.column)
            return self._cache[file]

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())


def _open_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e


def _is_text_type(kind) -> bool:
    import pyarrow as pa

    checks = ("is_string", "is_large_string", "is_string_view", "is_binary", "is_large_binary",
              "is_binary_view", "is_null")
    return any(getattr(pa.types, name, lambda _: False)(kind) for name in checks)


def _parquet_text(value, path: str, row: int, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: row {row}: column {column!r}: not valid utf-8 ({e})") from e
    return value


def _read_row_groups(path: str, column: str, stop_rows: int | None = None,
                     stop_bytes: int | None = None) -> list[tuple[int, object]]:
    """(rows, the column of that row group as an arrow array, or the ValueError naming file, rows
    and column that reading it raised) per row group; stops after `stop_rows` / `stop_bytes`."""
    meta = _open_parquet(path)
    out, start, nbytes = [], 0, 0
    for g in range(meta.num_row_groups):
        if (stop_rows is not None and start >= stop_rows) or (stop_bytes is not None and nbytes >= stop_bytes):
            break
        rows = meta.metadata.row_group(g).num_rows
        try:
            chunk = meta.read_row_group(g, columns=[column]).column(0)
            nbytes += chunk.nbytes
        except Exception as e:  # a damaged page: pyarrow raises OSError, ArrowInvalid, ...
            chunk = ValueError(f"{path}: rows {start}-{start + rows - 1}: column {column!r} "
                               f"cannot be read ({type(e).__name__}: {e})")
        out.append((rows, chunk))
        start += rows
    return out


@functools.lru_cache(maxsize=4096)
def _scan_parquet(path: str, size: int, mtime_ns: int, column: str, skip: bool,
                  max_records: int, max_bytes: int) -> frozenset[int]:
    """Read and decode the first rows of the column: raise on the first bad one, or (skip)
    return the bad row numbers and log their count once (cached per file version)."""
    import pyarrow as pa

    bad, first, start = [], "", 0
    for rows, chunk in _read_row_groups(path, column, max_records, max_bytes):
        if isinstance(chunk, ValueError):
            if not skip:
                raise chunk
            bad.extend(range(start, start + rows))
            first = first or str(chunk)
        elif not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
            for row, value in enumerate(chunk.to_pylist(), start):  # binary: check the utf-8
                try:
                    _parquet_text(value, path, row, column)
                except ValueError as e:
                    if not skip:
                        raise
                    bad.append(row)
                    first = first or str(e)
        start += rows
    _log_skipped(path, len(bad), start, first)
    return frozenset(bad)


class ArrayRecordFiles(grain.sources.RandomAccessDataSource):
    """One utf-8 document per ArrayRecord record (undecodable bytes become U+FFFD)."""

    def __init__(self, paths: Sequence[os.PathLike | str]):
        self.paths = [str(p) for p in paths]
        self._records = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> str:
        return self._records[index].decode("utf-8", errors="replace")


class Subset(grain.sources.RandomAccessDataSource):
    """`source` restricted to `indices` (a split); documents are str (a chat source: dicts)."""

    def __init__(self, source, indices: np.ndarray):
        self.source = source
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> str | dict:
        return self.source[int(self.indices[index])]


# ---------------------------------------------------------------- from a DataSpec


def expand_path(spec: DataSpec) -> list[pathlib.Path]:
    """The sorted files that `spec.path` names: a file or a glob (`**` recurses)."""
    path = os.path.expanduser(spec.path)
    if os.path.isdir(path):
        raise ValueError(f"data: path={spec.path!r} is a directory: give a file or a glob such as "
                         f"'{path.rstrip('/')}/**/*{_SUFFIX[spec.source]}'")
    files = sorted(pathlib.Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if not files:
        raise ValueError(f"data: path={spec.path!r} matches no files: expected an existing "
                         f"{spec.source} file or a glob pattern that matches some")
    return files


_SUFFIX = {"text": ".txt", "jsonl": ".jsonl", "chat": ".jsonl", "parquet": ".parquet", "arrayrecord": ".array_record"}


def open_source(spec: DataSpec) -> grain.sources.RandomAccessDataSource:
    """All documents of a non-stdlib `spec`, both splits."""
    files = expand_path(spec)
    if spec.source == "text":
        return TextFiles(files)
    if spec.source == "jsonl":
        return JsonlFiles(files, spec.text_field, spec.skip_bad_records)
    if spec.source == "chat":
        from lcjax.data.chat import ChatFiles  # chat.py builds on JsonlFiles

        return ChatFiles(files, spec.text_field, spec.skip_bad_records)
    if spec.source == "parquet":
        return ParquetFiles(files, spec.text_field, spec.skip_bad_records)
    if spec.source == "arrayrecord":
        return ArrayRecordFiles(files)
    raise ValueError(f"data: source={spec.source!r} is invalid: expected one of "
                     f"{list(_SUFFIX)} here (stdlib has no path)")


def document_source(spec: DataSpec, split: str) -> grain.sources.RandomAccessDataSource:
    """The documents (str) of `split`; ValueError when it holds none, saying what to change."""
    _check_split(split)
    if spec.source == "stdlib":
        docs = TextFiles(stdlib_corpus(split, spec.heldout_fraction))
        where = f"the Python standard library under {stdlib_root()}"
    else:
        full = open_source(spec)
        check(len(full) > 0, "path", spec.path, f"{spec.source} files that hold some documents")
        mask = heldout_mask(len(full), spec.heldout_fraction)
        docs = Subset(full, np.flatnonzero(mask if split == "heldout" else ~mask))
        where = f"data.path={spec.path!r} ({len(full)} documents)"
    if len(docs) == 0:
        raise ValueError(f"data: the {split} split of {where} is empty at "
                         f"heldout_fraction={spec.heldout_fraction}: "
                         + ("raise data.heldout_fraction or add documents" if split == "heldout"
                            else "lower data.heldout_fraction or add documents"))
    return docs
