"""Sources on S3, read from a real S3-compatible server (moto, credentials checked, taken from the
environment): the same batches as from local disk, resume, and clear errors for a wrong bucket, wrong
credentials or no server."""

from __future__ import annotations

import json
import logging
import re
import socket

import pytest
import torch

from data_pipelines import BatchStream, DataConfig, SourceError
from data_pipelines.config import SourceConfig
from data_pipelines.inspect_data import lines as inspect_lines
from data_pipelines.sources import BAD_COLUMN, open_source
from tests.s3_server import s3_server

BUCKET = "zr-data"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, with the same 4 JSON-lines shards in s3://zr-data/corpus/ and in a local folder."""
    local = tmp_path_factory.mktemp("s3-corpus")
    for shard in range(4):
        docs = [f"shard {shard} document {i}: " + "abc" * (i % 7) for i in range(25)]
        (local / f"part-{shard}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    with s3_server() as server:
        fs = server.filesystem()
        fs.mkdir(BUCKET)
        fs.pipe({f"{BUCKET}/corpus/{f.name}": f.read_bytes() for f in local.iterdir()})
        yield server, local


def config(path, storage_options=None) -> DataConfig:
    source = {"path": str(path), "storage_options": storage_options or {}}
    # loader_workers=0: read in this process (a loader process costs seconds of imports; the order is the same)
    return DataConfig(sources=[source], tokenizer="bytes", seq_len=16, tokenize_batch=3, streams=2,
                      loader_workers=0)


def take(stream, n):
    return [next(stream)["input_ids"] for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_batches_from_s3_equal_local_ones_and_resume(s3):
    server, local = s3
    on_s3 = config(f"s3://{BUCKET}/corpus/*.jsonl", server.storage_options())
    reference = take(BatchStream(config(local), 4), 60)  # 60 × 4 windows of 16: past one epoch
    assert same(take(BatchStream(on_s3, 4), 60), reference)
    # a folder URL lists the same files; resume from the middle of a file
    folder = config(f"s3://{BUCKET}/corpus/", server.storage_options())
    first = BatchStream(folder, 4)
    head = take(first, 7)
    resumed = BatchStream(folder, 4)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert same(head + take(resumed, 53), reference)


def test_object_deleted_after_listing_is_one_unreadable_file_row(s3, caplog):
    server, _ = s3
    fs = server.filesystem()
    fs.pipe({f"{BUCKET}/gone/a.jsonl": b'{"text": "a"}\n', f"{BUCKET}/gone/b.jsonl": b'{"text": "b"}\n'})
    ds = open_source(SourceConfig(path=f"s3://{BUCKET}/gone/*.jsonl", storage_options=server.storage_options()),
                     "text")
    fs.rm(f"{BUCKET}/gone/a.jsonl")
    with caplog.at_level(logging.WARNING, logger="zeroray.data"):
        rows = list(ds)
    assert rows == [{"text": None, BAD_COLUMN: "unreadable_file"}, {"text": "b", BAD_COLUMN: None}]
    assert f"s3://{BUCKET}/gone/a.jsonl" in caplog.text


def test_wrong_bucket_credentials_or_endpoint_are_clear_errors(s3, monkeypatch):
    server, _ = s3
    with pytest.raises(SourceError, match=r"'s3://no-such-bucket/\*.jsonl' matches no files .*keys: endpoint_url"):
        BatchStream(config("s3://no-such-bucket/*.jsonl", server.storage_options()), 4)
    with (server.credentials(secret="not-the-secret"),
          pytest.raises(SourceError, match="listing its files failed \\(PermissionError: .*signature") as err):
        BatchStream(config(f"s3://{BUCKET}/corpus/*.jsonl", server.storage_options()), 4)
    assert "not-the-secret" not in str(err.value) and server.key not in str(err.value)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would only lengthen the wait
    with pytest.raises(SourceError, match="listing its files failed .*Could not connect"):
        BatchStream(config(f"s3://{BUCKET}/corpus/", server.storage_options(endpoint_url=nobody)), 4)


def test_inspect_reads_an_s3_source(s3):
    # In-process: `zeroray data inspect` in a subprocess costs ~15 s of imports on a shared 2-core machine.
    server, _ = s3
    url = f"s3://{BUCKET}/corpus/*.jsonl"
    out = inspect_lines(config(url, server.storage_options()))
    source_line = next(line for line in out if url in line)
    assert "weight share 100.0%" in source_line and re.search(r"\b100 \w+ sampled", source_line), source_line
