"""Sources: the stdlib corpus and its split rule, each file format, and bad input."""

import json

import numpy as np
import pytest

from lcjax.data import DataSpec, document_source, stdlib_corpus
from lcjax.data.sources import (STDLIB_EXCLUDED_DIRS, heldout_mask, path_is_heldout, stdlib_root)


# ---------------------------------------------------------------- stdlib


def test_stdlib_split_is_disjoint_sorted_and_complete():
    root = stdlib_root()
    train, held = stdlib_corpus("train"), stdlib_corpus("heldout")
    rel = lambda ps: [p.relative_to(root).as_posix() for p in ps]  # noqa: E731
    assert rel(train) == sorted(rel(train)) and rel(held) == sorted(rel(held))
    assert not set(train) & set(held)
    assert len(train) > 300 and 0 < len(held) < 0.05 * len(train)
    assert all(path_is_heldout(r, 0.02) for r in rel(held))
    assert not any(path_is_heldout(r, 0.02) for r in rel(train))
    for r in rel(train + held):
        assert r.endswith(".py") and not STDLIB_EXCLUDED_DIRS & set(r.split("/")[:-1])
    assert "os.py" in rel(train) and "json/decoder.py" in rel(train)
    assert stdlib_corpus("train") == train  # stable


def test_split_rules_are_pinned():
    # crc32 of the relative path: fixed forever, whatever files a Python version ships.
    assert path_is_heldout("asyncio/locks.py", 0.02) and path_is_heldout("xml/sax/handler.py", 0.02)
    assert not path_is_heldout("os.py", 0.02) and not path_is_heldout("json/decoder.py", 0.02)
    # splitmix64 of the document index.
    assert np.flatnonzero(heldout_mask(500, 0.02)).tolist() == [48, 68, 120, 133, 173, 186, 196,
                                                                295, 320, 377, 445, 448, 472]
    assert abs(heldout_mask(100_000, 0.02).mean() - 0.02) < 0.002
    assert not heldout_mask(1000, 0.0).any()


def test_bad_split():
    with pytest.raises(ValueError, match=r"split='test'.*\['train', 'heldout'\]"):
        stdlib_corpus("test")


# ---------------------------------------------------------------- formats


def _both_splits(spec):
    train, held = document_source(spec, "train"), document_source(spec, "heldout")
    mask = heldout_mask(len(train) + len(held), spec.heldout_fraction)
    return [train[i] for i in range(len(train))], [held[i] for i in range(len(held))], mask


def _check_split(spec, docs):
    train, held, mask = _both_splits(spec)
    assert train == [d for d, m in zip(docs, mask) if not m]
    assert held == [d for d, m in zip(docs, mask) if m]
    assert held and train


def test_text_files(spec, docs):
    _check_split(spec, docs)


def test_jsonl(tmp_path, docs):
    lines = [json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)]
    half = len(lines) // 2  # two files; blank lines and CRLF endings are fine
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:half]) + "\n\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_bytes(("\r\n".join(lines[half:]) + "\r\n  \r\n").encode())
    spec = DataSpec(source="jsonl", path=str(tmp_path / "*.jsonl"), text_field="body",
                    heldout_fraction=0.25)
    train, held, _ = _both_splits(spec)
    assert sorted(train + held) == sorted(docs + [""])  # the whitespace-only line: an empty doc
    _check_split(spec, docs + [""])


def test_parquet(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = docs[:-1] + [None]  # a null is an empty document
    pq.write_table(pa.table({"text": texts[:25], "n": list(range(25))}), tmp_path / "0.parquet",
                   row_group_size=10)
    pq.write_table(pa.table({"text": texts[25:], "n": list(range(len(texts) - 25))}),
                   tmp_path / "1.parquet")
    spec = DataSpec(source="parquet", path=str(tmp_path / "*.parquet"), heldout_fraction=0.25)
    _check_split(spec, docs[:-1] + [""])


def test_arrayrecord(tmp_path, docs):
    from array_record.python.array_record_module import ArrayRecordWriter

    for name, part in (("0", docs[:15]), ("1", docs[15:])):
        writer = ArrayRecordWriter(str(tmp_path / f"{name}.array_record"), "group_size:1")
        for d in part:
            writer.write(d.encode("utf-8"))
        writer.close()
    spec = DataSpec(source="arrayrecord", path=str(tmp_path / "*.array_record"),
                    heldout_fraction=0.25)
    _check_split(spec, docs)


# ---------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    spec = DataSpec(source="text", path=str(tmp_path / "nope" / "*.txt"))
    with pytest.raises(ValueError, match=r"data: path=.*nope.* matches no files"):
        document_source(spec, "train")


def test_directory_path_suggests_glob(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory: give a file or a glob such as .*\*\*/\*\.jsonl"):
        document_source(DataSpec(source="jsonl", path=str(tmp_path)), "train")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"data: path=.*expected jsonl files that hold some documents"):
        document_source(DataSpec(source="jsonl", path=str(tmp_path / "empty.jsonl")), "train")


def test_empty_heldout_split(spec):
    with pytest.raises(ValueError, match=r"heldout split .* is empty at heldout_fraction=0.0: raise"):
        document_source(DataSpec(source="text", path=spec.path, heldout_fraction=0.0), "heldout")


def test_jsonl_missing_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:1: no field 'text' \(has \['body'\]\); set data.text_field"):
        document_source(DataSpec(source="jsonl", path=str(tmp_path / "a.jsonl")), "train")


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:3: not a JSON object"):  # when opened, not read
        document_source(DataSpec(source="jsonl", path=str(tmp_path / "a.jsonl"),
                                 heldout_fraction=0.0), "train")


def test_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"no column 'text' \(has \['body'\]\); set data.text_field"):
        document_source(DataSpec(source="parquet", path=str(tmp_path / "a.parquet")), "train")


@pytest.mark.parametrize("kwargs, match", [
    ({"source": "csv", "path": "x"}, r"data: source='csv' is invalid: expected one of \['stdlib'"),
    ({"source": "jsonl"}, r"data: path='' is invalid: expected a file or glob pattern of jsonl"),
    ({"path": "x.txt"}, r"data: path='x.txt' is invalid: expected '' with source='stdlib'"),
    ({"source": "parquet", "path": "x", "text_field": ""}, r"data: text_field='' is invalid"),
    ({"seq_len": 1}, r"data: seq_len=1 is invalid: expected an integer >= 2"),
    ({"global_batch": 0}, r"data: global_batch=0 is invalid"),
    ({"num_workers": -1}, r"data: num_workers=-1 is invalid"),
    ({"shuffle_seed": -1}, r"data: shuffle_seed=-1 is invalid"),
    ({"heldout_fraction": 1.0}, r"data: heldout_fraction=1.0 is invalid: expected a fraction in \[0, 1\)"),
    ({"tokenizer_train_bytes": 0}, r"data: tokenizer_train_bytes=0 is invalid"),
])
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataSpec(**kwargs)


def test_per_host_batch():
    assert DataSpec(global_batch=8).per_host_batch(4) == 2
    with pytest.raises(ValueError, match=r"data: global_batch=8 is invalid: expected a multiple of the host count 3"):
        DataSpec(global_batch=8).per_host_batch(3)
