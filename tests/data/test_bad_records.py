"""Malformed JSONL lines and Parquet rows fail before training, naming file and line (or row and
column); with data.skip_bad_records they become empty documents, counted once per file."""

import json
import logging

import pytest

from lcjax.config_io import load_config, resolve_config_path
from lcjax.data import DataSpec, document_source
from lcjax.data import sources


def _jsonl(path, bad_lines, n=200):
    """n records, `{"text": "doc i"}` on line i + 1, except malformed ones at `bad_lines`."""
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(n)]
    for line, text in bad_lines.items():
        lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def _all(spec):
    docs = []
    for split in ("train", "heldout"):
        source = document_source(spec, split)
        docs += [source[i] for i in range(len(source))]
    return docs


@pytest.fixture(autouse=True)
def _fresh_scans():
    """Scans are cached per file version; tests reuse tmp names, so start each one clean."""
    sources._scan_jsonl.cache_clear()
    sources._scan_parquet.cache_clear()
    sources._late_skips.clear()


@pytest.mark.parametrize("text, what", [
    ('{"text": "unterminated', "not a JSON object"),
    ('["a list"]', r"no field 'text' \(has list\)"),
    ('{"body": "x"}', r"no field 'text' \(has \['body'\]\)"),
    ('{"text": 5}', "field 'text' is int, expected a string"),
])
def test_bad_jsonl_line_fails_when_the_source_opens(tmp_path, text, what):
    path = _jsonl(tmp_path / "a.jsonl", {151: text})
    with pytest.raises(ValueError, match=rf"a.jsonl:151: {what}"):
        document_source(DataSpec(source="jsonl", path=str(path), heldout_fraction=0.1), "train")


def test_skip_bad_records_counts_once_per_file(tmp_path, caplog):
    _jsonl(tmp_path / "a.jsonl", {3: "{oops", 151: '{"text": null}'})
    _jsonl(tmp_path / "b.jsonl", {})
    spec = DataSpec(source="jsonl", path=str(tmp_path / "*.jsonl"), heldout_fraction=0.1,
                    skip_bad_records=True)
    with caplog.at_level(logging.WARNING, logger="lcjax.data"):
        docs = _all(spec)
    assert sorted(docs) == sorted([""] * 2 + [f"doc {i}" for i in range(200) if i not in (2, 150)]
                                  + [f"doc {i}" for i in range(200)])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines  # both splits opened the source; one line for the one bad file
    assert "a.jsonl: skipped 2 bad record(s) of the first 200" in lines[0] and "a.jsonl:3:" in lines[0]


def test_bad_record_past_the_scan_fails_or_is_skipped_when_read(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sources, "SCAN_RECORDS", 10)
    path = _jsonl(tmp_path / "a.jsonl", {50: "{oops", 60: "{oops"})
    source = sources.JsonlFiles([path], "text")  # the first 10 records are fine
    assert source[48] == "doc 48"
    with pytest.raises(ValueError, match=r"a.jsonl:50: not a JSON object"):
        source[49]
    skipping = sources.JsonlFiles([path], "text", skip_bad_records=True)
    with caplog.at_level(logging.WARNING, logger="lcjax.data"):
        assert skipping[49] == "" and skipping[59] == "" and skipping[50] == "doc 50"
    assert len(caplog.records) == 1 and "a.jsonl:50:" in caplog.records[0].getMessage()


def test_bad_jsonl_past_the_byte_bound_is_not_scanned(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SCAN_BYTES", 100)
    path = _jsonl(tmp_path / "a.jsonl", {151: "{oops"})
    assert len(sources.JsonlFiles([path], "text")) == 200


# ---------------------------------------------------------------- parquet


def _parquet(path, values, kind=None, row_group_size=50):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array(values, kind)}), path, row_group_size=row_group_size)
    return path


def test_corrupt_parquet_names_the_file(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"PAR1 this is not parquet at all" * 10)
    with pytest.raises(ValueError, match=r"a.parquet: not a readable Parquet file"):
        document_source(DataSpec(source="parquet", path=str(tmp_path / "a.parquet")), "train")


def test_damaged_parquet_page_names_file_rows_and_column(tmp_path):
    import pyarrow.parquet as pq

    path = _parquet(tmp_path / "a.parquet", [f"document number {i} " * 20 for i in range(200)])
    data = bytearray(path.read_bytes())
    page = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data[page:page + 16] = b"\xff" * 16  # the page header of the second row group (rows 50-99)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"a.parquet: rows 50-99: column 'text' cannot be read"):
        sources.ParquetFiles([path], "text")
    skipping = sources.ParquetFiles([path], "text", skip_bad_records=True)
    docs = [skipping[i] for i in range(len(skipping))]
    assert docs == [f"document number {i} " * 20 if not 50 <= i < 100 else "" for i in range(200)]


def test_parquet_non_text_column_and_bad_utf8_row(tmp_path, caplog):
    import pyarrow as pa

    _parquet(tmp_path / "ints.parquet", list(range(10)))
    with pytest.raises(ValueError, match=r"ints.parquet: column 'text' has type int64, expected strings"):
        sources.ParquetFiles([tmp_path / "ints.parquet"], "text")
    values = [f"doc {i}".encode() for i in range(120)]
    values[77] = b"\xff\xfe not utf-8"
    path = _parquet(tmp_path / "bin.parquet", values, pa.binary())
    with pytest.raises(ValueError, match=r"bin.parquet: row 77: column 'text': not valid utf-8"):
        sources.ParquetFiles([path], "text")
    with caplog.at_level(logging.WARNING, logger="lcjax.data"):
        skipping = sources.ParquetFiles([path], "text", skip_bad_records=True)
    assert skipping[77] == "" and skipping[76] == "doc 76"
    assert len(caplog.records) == 1 and "skipped 1 bad record(s) of the first 120" in caplog.text


def test_skip_bad_records_from_yaml_overrides():
    config = load_config(resolve_config_path("tiny"), ["data.skip_bad_records=true"])
    assert config.data.skip_bad_records is True
    with pytest.raises(ValueError, match=r"skip_bad_records"):
        load_config(resolve_config_path("tiny"), ["data.skip_bad_records=maybe"])
