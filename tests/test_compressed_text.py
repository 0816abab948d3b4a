"""Compressed JSON-lines and text (.gz, .bz2, .xz, .zst): read by the streaming sources as their plain twins,
resumed exactly, damaged files counted under data.bad_data, unsupported shapes refused by name; and
`zeroray data prepare` streaming a folder of .gz files into shards without holding the corpus."""

from __future__ import annotations

import gzip
import json
import logging
import random
import tracemalloc

import fsspec
import pyarrow.parquet as pq
import pytest
import tokenizers  # noqa: F401  imported here, not inside the traced prepare below
import torch

from data_pipelines import BadDataError, BatchStream, DataConfig, SourceConfig, SourceError
from data_pipelines.documents import DocumentReader, stream_rows
from data_pipelines.prepare import prepare
from data_pipelines.sources import BAD_COLUMN, open_source

CODECS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}


def write(path, data: bytes, codec: str | None = None):
    """`data` written to `path`, compressed with fsspec's codec of that name (None: plain)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with fsspec.filesystem("file").open(str(path), "wb", compression=codec) as f:  # not fsspec.open: `::` in names
        f.write(data)
    return path


def jsonl(docs) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def rows(path, **source):
    return list(open_source(SourceConfig(path=str(path), **source), "text"))


def good(text):
    return {"text": text, BAD_COLUMN: None}


def byte_config(path, streams=1, **kw) -> DataConfig:
    return DataConfig(sources=[{"path": str(path)}], tokenizer="bytes", seq_len=16, tokenize_batch=3,
                      streams=streams, loader_workers=0, **kw)


def take(stream, n):
    return [next(stream)["input_ids"] for _ in range(n)]


def test_compressed_files_read_as_their_plain_twins(tmp_path):
    docs = [f"doc {i}: caf\u00e9 " * (i % 5 + 1) for i in range(30)]
    plain = write(tmp_path / "plain" / "a.jsonl", jsonl(docs))
    expected = rows(plain)
    assert expected == [good(d) for d in docs]
    for suffix, codec in CODECS.items():
        # A folder lists `x.jsonl<suffix>` by the suffix under the compression one, and reads it decompressed.
        folder = tmp_path / suffix[1:]
        write(folder / f"a.jsonl{suffix}", jsonl(docs), codec)
        write(folder / "notes.csv.gz", b"not, listed\n", "gzip")  # not a data format: left out of the folder
        assert rows(folder) == expected, suffix
        # Text files: one document per file, as plain ones.
        write(folder / "t" / f"page.txt{suffix}", b"line one\r\nline two\n", codec)
        assert rows(folder / "t") == [good("line one\nline two\n")], suffix
    # Man pages (`ls.1.gz`): no format under the compression suffix, so a glob with `format: text`.
    # `::` in a name (Perl's man pages) is a file name, not an fsspec URL chain.
    names = ("man1/ls.1.gz", "man3/Dpkg::Deps.3perl.gz", "man5/passwd.5.gz")
    for name in names:
        write(tmp_path / "man" / name, f".TH {name}\n".encode(), "gzip")
    with pytest.raises(SourceError, match=r"cannot tell one format .*\(\.1, \.3perl, \.5\); set `format:`"):
        rows(tmp_path / "man" / "**" / "*.gz")
    assert rows(tmp_path / "man" / "**" / "*.gz", format="text") == [good(f".TH {n}\n") for n in names]


def compressed_corpus(tmp_path):
    """Four JSON-lines files, one per codec: four shards, two per logical stream."""
    folder = tmp_path / "corpus"
    for f, (suffix, codec) in enumerate(CODECS.items()):
        write(folder / f"part{f}.jsonl{suffix}", jsonl(f"file {f} doc {i}: " + "xyz" * (i % 9) for i in range(20)),
              codec)
    return folder


def test_resume_over_compressed_files_gives_the_same_next_batches(tmp_path):
    cfg = byte_config(compressed_corpus(tmp_path), streams=2)
    uninterrupted = take(BatchStream(cfg, 4), 150)  # several epochs over the 80 documents
    first = BatchStream(cfg, 4)
    head = take(first, 25)  # mid-file in every stream
    second = BatchStream(cfg, 4)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    middle = take(second, 50)
    third = BatchStream(cfg, 4)
    third.load_state_dict(json.loads(json.dumps(second.state_dict())))
    tail = take(third, 75)
    assert min(s["epoch"] for s in third.state_dict()["streams"].values()) >= 2, "resumes across epochs too"
    assert all(torch.equal(x, y) for x, y in zip(uninterrupted, head + middle + tail, strict=True))


def damaged_folder(tmp_path):
    """Two good files and four damaged ones: truncated gzip and zstd (records before the cut still read),
    a gzip file with corrupt bytes mid-stream, and a .zst that is no zstd at all."""
    folder = tmp_path / "damaged"
    records = [f"record {i} " + f"{random.Random(i).getrandbits(32):08x}" * 30 for i in range(2000)]  # ~500 KB
    write(folder / "a.jsonl", jsonl(["a"]))
    for name, codec in (("b.jsonl.gz", "gzip"), ("c.jsonl.zst", "zstd")):
        whole = write(folder / name, jsonl(records), codec).read_bytes()
        (folder / name).write_bytes(whole[: len(whole) // 2])
    corrupt = bytearray(gzip.compress(jsonl(records)))
    corrupt[len(corrupt) // 2: len(corrupt) // 2 + 64] = bytes(64)
    (folder / "d.jsonl.gz").write_bytes(bytes(corrupt))
    (folder / "e.jsonl.zst").write_bytes(b"no zstd frame here\n" * 10)
    write(folder / "f.jsonl.xz", jsonl(["f"]), "xz")
    return folder, records


def test_truncated_and_corrupt_files_are_counted_as_unreadable_under_bad_data(tmp_path, caplog):
    folder, records = damaged_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="zeroray.data"):
        got = rows(folder)
    unreadable = [i for i, r in enumerate(got) if r[BAD_COLUMN]]
    assert [got[i][BAD_COLUMN] for i in unreadable] == ["unreadable_file"] * 4  # one per damaged file, no crash
    assert got[0] == good("a") and got[-1] == good("f")
    # Each damaged file gives the records before the damage, in order, then its one unreadable row.
    partial_b = got[1:unreadable[0]]
    partial_c = got[unreadable[0] + 1:unreadable[1]]
    for partial in (partial_b, partial_c):
        assert 0 < len(partial) < len(records) and partial == [good(r) for r in records[: len(partial)]]
    assert unreadable[3] == unreadable[2] + 1, "a .zst with no zstd frame reads no record"
    for name in ("b.jsonl.gz", "c.jsonl.zst", "d.jsonl.gz", "e.jsonl.zst"):
        assert str(folder / name) in caplog.text

    # The stream skips and counts them (data.bad_data skip): 4 unreadable out of ~2000 records is under 1%.
    reader = documents(byte_config(folder))
    while reader.epoch == 0:
        reader.next_document()
    # The call that ends the pass returns the next pass's first document (with this seed, from a good file).
    assert reader.counts.bad == [{"unreadable_file": 4}]
    assert reader.counts.documents == [len(got) - 4 + 1]
    # … and stops as data.bad_data says: at the first one under `fail`, past max_fraction under `skip`.
    for policy, message in (
        ({"policy": "fail"}, r"holds an unusable record \(unreadable_file: the log names the file\)"),
        # 4 in ~3000 records: the second one breaks 0.05%.
        ({"max_fraction": 0.0005, "min_records": 10}, r"read [234] unusable record\(s\) out of \d+ .*unreadable_file"),
    ):
        reader = documents(byte_config(folder, bad_data=policy))
        with pytest.raises(BadDataError, match=message):
            while reader.epoch == 0:
                reader.next_document()


def documents(cfg: DataConfig) -> DocumentReader:
    """Logical stream 0's documents, counted under cfg.bad_data."""
    return DocumentReader(cfg, 0, stream_rows(cfg, [0])[0])


@pytest.mark.parametrize(("name", "fix"), [
    ("a.jsonl.lz4", r"lz4 compression is not read here; recompress the file .*\(\.gz, \.bz2, \.xz or \.zst"),
    ("a.jsonl.Z", r"compress \(\.Z\) compression is not read here"),
    ("corpus.tar.gz", r"a \.tar\.gz archive holds many files .*extract it \(`tar -xf` / `unzip`\)"),
    ("corpus.zip", r"a \.zip archive holds many files"),
    ("a.parquet.gz", r"is a compressed parquet file; .*decompress it \(e.g. `gzip -d`\)"),
])
def test_unsupported_compressions_are_clear_errors_naming_the_file(tmp_path, name, fix):
    path = write(tmp_path / "data" / name, b"whatever\n")
    source = str(tmp_path / "data" / "*") if name.startswith("corpus") else str(tmp_path / "data")
    fmt = {"format": "text"} if name.startswith("corpus") else {}  # an archive has no format to tell
    with pytest.raises(SourceError, match=fix) as err:
        open_source(SourceConfig(path=source, **fmt), "text")
    assert str(path) in str(err.value)
    if name.endswith(".lz4"):  # prepare refuses it the same way (--extensions picked it)
        with pytest.raises(ValueError, match=fix):
            prepare(tmp_path / "out", tmp_path / "data", shards=1, vocab_size=300, extensions=(".lz4",))


WORDS = [f"w{i:03d}" for i in range(400)] + ["the", "of", ".TH", ".SH", "\\fB", "\\fR"]


def man_folder(tmp_path, files=120, words=3000):
    """`files` gzipped man-page-like documents (~17 KB of text each) in section folders, plus a truncated
    one and a binary one; returns the folder and the documents' texts by relative path."""
    folder, texts = tmp_path / "man", {}
    for i in range(files):
        rng = random.Random(i)
        rel = f"man{i % 8 + 1}/page{i:03d}.{i % 8 + 1}.gz"
        texts[rel] = f".TH PAGE{i}\n" + " ".join(rng.choices(WORDS, k=words)) + "\n"
        write(folder / rel, texts[rel].encode(), "gzip")
    whole = gzip.compress(texts[rel].encode())
    (folder / "man1" / "cut.1.gz").write_bytes(whole[: len(whole) // 2])
    write(folder / "man1" / "binary.1.gz", bytes(range(256)) * 4, "gzip")
    return folder, texts


def test_prepare_streams_a_folder_of_gz_files_into_shards(tmp_path):
    folder, texts = man_folder(tmp_path)
    corpus = sum(len(t) for t in texts.values())  # ~2 MB of text, 120 documents
    out = tmp_path / "prep"
    tracemalloc.start()
    try:
        report = prepare(out, folder, shards=4, vocab_size=400, val_fraction=0.05, extensions=(".gz",),
                         buffer_bytes=64 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Streamed: Python's peak is a few documents and the buffers (~0.2× this corpus), not the corpus (holding
    # it, as prepare did before, peaks above 1×: buffer_bytes=10**9 shows it).
    assert peak < corpus / 3, (peak, corpus)

    assert (report.not_text, report.unreadable) == (1, 1)
    assert "cut.1.gz" in report.lines()[-1] or "binary.1.gz" in report.lines()[-1]
    shards = sorted((out / "train").glob("*.parquet"))
    assert [s.name for s in shards] == [f"shard-{i:05d}.parquet" for i in range(4)]
    # Written in chunks: each shard is several row groups of about its share of the buffer.
    assert all(pq.ParquetFile(s).num_row_groups >= 5 for s in shards)
    written = {}
    for part in ("train", "val"):
        for s in sorted((out / part).glob("*.parquet")):
            table = pq.read_table(s).to_pydict()
            written.update(zip(table["path"], table["text"], strict=True))
    assert written == texts  # every page, decompressed, once; the damaged ones left out
    assert report.train_docs + report.val_docs == len(texts) and report.val_docs > 0
    assert not list(out.glob(".prepare-*")), "the staging folder is gone"

    # The shards are a source like any other: one shard per file, every training document in them.
    train = open_source(SourceConfig(path=str(out / "train")), "text")
    assert train.num_shards == 4 and sum(1 for _ in train) == report.train_docs

    # A second prepare with fewer shards replaces the first's: no stale shard is left to be read as data.
    prepare(out, folder / "man2", shards=2, vocab_size=300, extensions=(".gz",))
    assert len(list((out / "train").glob("*.parquet"))) == 2


def test_prepare_of_a_folder_of_damaged_files_says_what_it_skipped(tmp_path):
    folder = tmp_path / "bad"
    whole = gzip.compress(b"some text " * 1000)
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "cut.txt.gz").write_bytes(whole[:40])
    with pytest.raises(ValueError, match=r"no non-empty files with extensions \.gz \(1 skipped, e\.g\. "
                                         r"a/cut\.txt\.gz \(EOFError: Compressed file ended"):
        prepare(tmp_path / "out", folder, shards=1, vocab_size=300, extensions=(".gz",))
    assert not list((tmp_path / "out").iterdir()), "a failed prepare leaves nothing behind"
