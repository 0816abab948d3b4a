"""Sources at the row level: our JSON-lines/text reader turns every unusable record into one BAD_COLUMN row
(good rows unaffected, order kept), shards by file, resumes mid-file, and lists URLs (fsspec memory://)."""

from __future__ import annotations

import gzip
import json
import logging

import fsspec
import pytest
from datasets.distributed import split_dataset_by_node

from data_pipelines import SourceError
from data_pipelines.config import SourceConfig
from data_pipelines.sources import BAD_COLUMN, open_source


def rows(path, text_field="text", **source):
    return list(open_source(SourceConfig(path=str(path), **source), text_field))


def good(text, field="text"):
    return {field: text, BAD_COLUMN: None}


def bad(kind, field="text"):
    return {field: None, BAD_COLUMN: kind}


def test_every_bad_record_is_one_row_of_its_kind_in_place(tmp_path):
    lines = [
        b'{"body": "first", "id": 1}',
        b'{"body": "cut off',                      # malformed_json
        b"",                                       # blank lines are no records
        b'{"body": "caf\xe9"}',                    # latin-1 byte: undecodable_utf8
        b'{"body": "\\ud800 lone surrogate"}',     # valid JSON, but no UTF-8 text: undecodable_utf8
        b'{"text": "the wrong field"}',            # no_text_field
        b'{"body": 42}',                           # no_text_field (not a string)
        b'"just a string"',                        # no_text_field
        b'{"body": ""}',                           # an empty document is not bad data (the stream counts it)
        b'{"body": "last \xc3\xa9"}',
    ]
    (tmp_path / "a.jsonl").write_bytes(b"\r\n".join(lines) + b"\r\n")
    assert rows(tmp_path / "a.jsonl", "body") == [
        good("first", "body"), bad("malformed_json", "body"), bad("undecodable_utf8", "body"),
        bad("undecodable_utf8", "body"), bad("no_text_field", "body"), bad("no_text_field", "body"),
        bad("no_text_field", "body"), good("", "body"), good("last é", "body"),
    ]


def test_text_files_are_one_document_each_and_json_arrays_are_records(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\n")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "c.txt").write_bytes(b"")  # empty: no document at all
    (tmp_path / "d.txt").write_text("last\n")
    assert rows(tmp_path) == [good("line one\nline two\n"), bad("undecodable_utf8"), good("last\n")]
    (tmp_path / "e.json").write_text('[\n  {"text": "x"},\n  {"t": "y"},\n  {"text": "z"}\n]\n')
    assert rows(tmp_path / "e.json") == [good("x"), bad("no_text_field"), good("z")]


def test_a_file_that_fails_to_open_or_mid_read_is_one_unreadable_file_row(tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "a"}\n')
    (folder / "b.jsonl").write_text('{"text": "b"}\n')
    # A gzip file cut short: its first records read, then decompression fails mid-file.
    whole = gzip.compress("".join(json.dumps({"text": f"c{i}"}) + "\n" for i in range(5000)).encode())
    (folder / "c.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (folder / "d.jsonl").write_text('{"text": "d"}\n')
    ds = open_source(SourceConfig(path=str(folder / "*"), format="json"), "text")
    assert ds.num_shards == 4  # one shard per file
    (folder / "b.jsonl").unlink()  # deleted between listing and reading
    with caplog.at_level(logging.WARNING, logger="zeroray.data"):
        got = list(ds)
    assert got[:2] == [good("a"), bad("unreadable_file")]
    partial = got[2:-2]
    assert 0 < len(partial) < 5000 and partial == [good(f"c{i}") for i in range(len(partial))]
    assert got[-2:] == [bad("unreadable_file"), good("d")]
    assert str(folder / "b.jsonl") in caplog.text and "c.jsonl.gz" in caplog.text


def test_resume_mid_file_gives_exactly_the_rest_and_streams_get_whole_files(tmp_path):
    for f in range(4):
        lines = [json.dumps({"text": f"file {f} doc {i}"}) for i in range(5)] + ["not json"]
        (tmp_path / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    source = SourceConfig(path=str(tmp_path))
    everything = rows(tmp_path)
    assert len(everything) == 24 and everything[6] == good("file 1 doc 0")
    for k in (0, 3, 6, 11, 23):
        ds = open_source(source, "text")
        it = iter(ds)
        head = [next(it) for _ in range(k)]
        resumed = open_source(source, "text")
        resumed.load_state_dict(json.loads(json.dumps(ds.state_dict())))
        assert head + list(resumed) == everything
    stream1 = list(split_dataset_by_node(open_source(source, "text"), rank=1, world_size=2))
    assert stream1 == everything[6:12] + everything[18:]  # files 1 and 3, whole


def test_url_sources_are_listed_sorted_and_a_url_without_files_is_a_clear_error():
    fs = fsspec.filesystem("memory")
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl", "notes.csv"):
        fs.pipe(f"/zr-sources/{name}", json.dumps({"text": name}).encode() + b"\n")
    assert rows("memory://zr-sources/*.jsonl") == [good("a.jsonl"), good("b.jsonl")]
    assert rows("memory://zr-sources") == [good("a.jsonl"), good("b.jsonl"), good("sub/c.jsonl")]
    with pytest.raises(SourceError, match=r"'memory://zr-sources/\*.txt' matches no files \(storage_options keys: "
                                          r"secret\)") as err:
        open_source(SourceConfig(path="memory://zr-sources/*.txt", storage_options={"secret": "hunter2"}), "text")
    assert "hunter2" not in str(err.value)
    with pytest.raises(SourceError, match="cannot tell one format from the file extensions"):
        open_source(SourceConfig(path="memory://zr-sources/*"), "text")
