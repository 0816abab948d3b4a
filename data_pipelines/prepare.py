"""`zeroray data prepare`: parquet shards + a byte-level BPE tokenizer from a folder of text files.

The default folder is the running interpreter's standard-library source: real text that exists
on every machine that runs zeroray, so the demo needs no download.

Each file is one document; compressed files (`ls.1.gz`, `notes.txt.zst`: data_pipelines.readers) are
decompressed as they are read. The corpus is streamed, never held whole: documents go one at a time
into the shards, each shard writes a parquet row group whenever its buffered text passes its share of
`buffer_bytes`, and the tokenizer then trains from the written shards, one row group per shard at a
time. Memory is bounded by the buffers and the largest document, whatever the corpus size. The output
is staged inside --out and moved into place at the end: a failed run leaves the previous output as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.readers import compression_of, open_file
from data_pipelines.tokenizer import EOS_TOKEN

DEFAULT_EXTENSIONS = (".py", ".txt", ".md", ".rst")
# Vendored third-party code and generated test data are not the standard library's own text.
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}
# Text buffered for all shards together before it is written out (each shard flushes its share).
BUFFER_BYTES = 32 * 2**20
SCHEMA = pa.schema([("text", pa.string()), ("path", pa.string())])

log = logging.getLogger("zeroray.data")


def default_source() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class PrepareReport:
    out_dir: Path
    train_docs: int
    val_docs: int
    train_bytes: int
    shards: int
    vocab_size: int
    not_text: int = 0  # files skipped: not UTF-8 (binary)
    unreadable: int = 0  # files skipped: unreadable (e.g. a truncated or corrupt compressed file)
    first_skipped: str = ""  # the first of them, and why

    def lines(self) -> list[str]:
        lines = [
            f"wrote {self.train_docs} training documents ({self.train_bytes / 1e6:.1f} MB) in {self.shards} "
            f"parquet shards to {self.out_dir / 'train'}",
            f"wrote {self.val_docs} held-out documents to {self.out_dir / 'val'}",
            f"trained a byte-level BPE tokenizer ({self.vocab_size} tokens): {self.out_dir / 'tokenizer.json'}",
        ]
        if self.not_text or self.unreadable:
            lines.append(f"skipped {self.not_text} file(s) that are not UTF-8 text and {self.unreadable} that "
                         f"could not be read; the first: {self.first_skipped}")
        return lines


class _Skipped:
    """Files left out of the corpus, counted for the report (the default corpus has a few binary ones)."""

    def __init__(self):
        self.not_text = self.unreadable = 0
        self.first = ""

    def add(self, rel: str, why: str, unreadable: bool) -> None:
        if unreadable:
            self.unreadable += 1
            log.warning("data prepare: skipping %s, which could not be read: %s", rel, why)
        else:
            self.not_text += 1
        self.first = self.first or f"{rel} ({why})"


def _matches(name: str, extensions: tuple[str, ...]) -> bool:
    # endswith, not Path.suffix: `--extensions .txt.gz` picks `a.txt.gz` and not `b.json.gz`.
    return name.endswith(extensions)


def _documents(source: Path, extensions: tuple[str, ...], skipped: _Skipped) -> Iterator[tuple[str, str]]:
    """(relative path, text) of every non-empty text file, in path order, read one at a time."""
    for path in sorted(source.rglob("*")):  # paths only: the texts are read below, one by one
        rel = path.relative_to(source)
        if any(part in SKIP_DIRS for part in rel.parts) or not _matches(path.name, extensions) or not path.is_file():
            continue
        compression_of(str(path))  # an archive or unsupported compression: a clear error, not a skipped file
        try:
            with open_file(str(path)) as f:
                data = f.read()
        except Exception as exc:  # OSError, and each decompressor's own: EOFError, zlib.error, LZMAError, ZstdError
            skipped.add(str(rel), f"{type(exc).__name__}: {exc}", unreadable=True)
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped.add(str(rel), "not UTF-8", unreadable=False)  # binary files are not training text
            continue
        if text.strip():
            # Universal newlines, as the text-mode read this replaced gave.
            yield str(rel), text.replace("\r\n", "\n").replace("\r", "\n")


def _is_validation(rel_path: str, fraction: float) -> bool:
    # Hash of the path, not a random draw: the split is the same on every machine and every run.
    digest = int(hashlib.sha256(rel_path.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < fraction


class _ShardWriter:
    """Documents dealt round robin into `count` parquet files (document k → shard k % count), each shard
    buffering its rows until they pass its share of `buffer_bytes`, then writing them as one row group."""

    def __init__(self, folder: Path, count: int, buffer_bytes: int):
        folder.mkdir(parents=True)
        self.files = [folder / f"shard-{i:05d}.parquet" for i in range(count)]
        self.docs = self.chars = 0
        self._limit = max(1, buffer_bytes // count)
        self._rows: list[list[tuple[str, str]]] = [[] for _ in range(count)]
        self._buffered = [0] * count
        self._writers: list[pq.ParquetWriter | None] = [None] * count

    def add(self, rel: str, text: str) -> None:
        i = self.docs % len(self.files)
        self._rows[i].append((rel, text))
        self._buffered[i] += len(text)
        self.docs += 1
        self.chars += len(text)
        if self._buffered[i] >= self._limit:
            self._flush(i)

    def _flush(self, i: int) -> None:
        rows = self._rows[i]
        if self._writers[i] is None:
            self._writers[i] = pq.ParquetWriter(self.files[i], SCHEMA)
        if rows:
            self._writers[i].write_table(
                pa.table({"text": [t for _, t in rows], "path": [p for p, _ in rows]}, schema=SCHEMA))
        self._rows[i], self._buffered[i] = [], 0

    def close(self) -> None:
        for i, _ in enumerate(self.files):
            self._flush(i)  # also creates a shard that got no document
            self._writers[i].close()


def _texts_in_order(files: list[Path]) -> Iterator[str]:
    """The texts of round-robin shards in the order they were written: shard i holds documents i, i+n,
    i+2n…, so taking one from each shard in turn gives the source order, which the tokenizer trained on
    when it was given the whole list. One row group per shard is in memory at a time."""
    columns = [_column(f) for f in files]
    while True:
        for column in columns:
            text = next(column, None)
            if text is None:  # the first shard to run out marks the end of all of them (round robin)
                return
            yield text


def _column(file: Path) -> Iterator[str]:
    parquet = pq.ParquetFile(file)
    for group in range(parquet.num_row_groups):
        yield from parquet.read_row_group(group, columns=["text"]).column(0).to_pylist()


def _publish(stage: Path, out_dir: Path) -> None:
    """Move the staged output into out_dir. The shards of an earlier prepare go first: a run with fewer
    --shards must not leave stale ones behind, to be read as data."""
    for name in ("train", "val"):
        target = out_dir / name
        target.mkdir(exist_ok=True)
        for old in target.glob("shard-*.parquet"):
            old.unlink()
        for new in sorted((stage / name).iterdir()):
            new.rename(target / new.name)
    os.replace(stage / "tokenizer.json", out_dir / "tokenizer.json")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_file: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out_file))
    return tok.get_vocab_size()


def prepare(
    out_dir: Path,
    source: Path | None = None,
    shards: int = 8,
    vocab_size: int = 8192,
    val_fraction: float = 0.02,
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
    buffer_bytes: int = BUFFER_BYTES,
) -> PrepareReport:
    source = source or default_source()
    if not source.is_dir():
        raise FileNotFoundError(f"--source {source} is not a folder; pass a folder of text files")
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        skipped = _Skipped()
        train = _ShardWriter(stage / "train", shards, buffer_bytes)
        val = _ShardWriter(stage / "val", 1, buffer_bytes)
        last_train = None
        for rel, text in _documents(source, extensions, skipped):
            if _is_validation(rel, val_fraction):
                val.add(rel, text)
            else:
                train.add(rel, text)
                last_train = (rel, text)
        if train.docs + val.docs == 0:
            found = f" ({skipped.not_text + skipped.unreadable} skipped, e.g. {skipped.first})" if skipped.first else ""
            raise ValueError(
                f"--source {source} has no non-empty files with extensions {', '.join(extensions)}{found}; "
                f"pass another folder or --extensions"
            )
        if val.docs == 0 and last_train:  # a tiny corpus: hold out (a copy of) the last training document
            val.add(*last_train)
        train.close()
        val.close()
        if train.docs < shards:
            raise ValueError(f"--shards {shards} is more than the {train.docs} training documents; use fewer shards")
        vocab = train_tokenizer(_texts_in_order(train.files), vocab_size, stage / "tokenizer.json")
        _publish(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report = PrepareReport(out_dir, train.docs, val.docs, train.chars, shards, vocab,
                           skipped.not_text, skipped.unreadable, skipped.first)
    (out_dir / "prepare.json").write_text(
        json.dumps({"source": str(source), **{k: str(v) for k, v in report.__dict__.items()}}, indent=2) + "\n"
    )
    return report
