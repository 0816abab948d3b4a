"""Turn a `SourceConfig` into a streaming Hugging Face `IterableDataset` of documents.

JSON-lines and text files (local or at fsspec URLs) are read by `data_pipelines.readers`, which turns
unusable records into BAD_COLUMN rows instead of failing the stream; parquet, arrow and Hub datasets go
through datasets' own builders (their rows are typed: no per-record parse errors to report).

JSON-lines and text files may be compressed (`a.jsonl.gz`, `b.txt.zst`; see readers.COMPRESSION_BY_SUFFIX):
the suffix under the compression one names the format, and each file is still one shard.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import fsspec
from datasets import Features, IterableDataset, Value, load_dataset

from data_pipelines.config import SourceConfig
from data_pipelines.readers import (
    BAD_COLUMN,
    BAD_KINDS,
    COMPRESSED_SUFFIXES,
    LINE_FORMATS,
    CompressionError,
    compression_of,
    read_files,
)

__all__ = ["BAD_COLUMN", "BAD_KINDS", "FORMAT_BY_EXTENSION", "SourceError", "open_source"]

FORMAT_BY_EXTENSION = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".txt": "text",
    ".md": "text",
    ".arrow": "arrow",
}
# A Hub dataset id: "name" or "owner/name", no extension, no path prefix.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_GLOB_CHARS = "*?["


class SourceError(ValueError):
    """A data source cannot be opened; the message says which and what to do."""


def is_url(path: str) -> bool:
    return "://" in path


def data_suffix(path: str) -> str:
    """The suffix that names a file's format, under a compression suffix: `a.jsonl.gz` → `.jsonl`."""
    p = Path(path)
    return Path(p.stem).suffix if p.suffix in COMPRESSED_SUFFIXES else p.suffix


def _is_data_file(path: str) -> bool:
    # What a folder listing keeps: known formats, compressed or not (an unsupported compression is
    # kept too, so that opening the source says what to do instead of skipping the file unseen).
    return data_suffix(path) in FORMAT_BY_EXTENSION


def _local_files(path: str) -> list[str]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = [str(f) for f in sorted(p.rglob("*")) if _is_data_file(f.name) and f.is_file()]
    elif any(ch in path for ch in _GLOB_CHARS):
        files = sorted(f for f in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(f))
    elif p.is_file():
        files = [str(p)]
    else:
        return []
    return files


def _url_files(url: str, storage_options: dict) -> list[str]:
    """The files a URL names (a file, a folder, or a glob), as full URLs in sorted order: each file is
    one shard, so the logical streams get whole files, the same list on every worker."""
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        if any(ch in root for ch in _GLOB_CHARS):
            found = fs.glob(root, detail=True)
            paths = [p for p, info in found.items() if info["type"] == "file"]
        elif fs.isdir(root):
            paths = [p for p in fs.find(root) if _is_data_file(p)]
        elif fs.isfile(root):
            paths = [root]
        else:
            paths = []
    except Exception as exc:  # each filesystem raises its own types (botocore, aiohttp, gcsfs…)
        raise SourceError(
            f"data source {url!r}: listing its files failed ({type(exc).__name__}: {exc}). Check the URL and "
            f"the source's storage_options ({option_keys(storage_options)}): credentials, endpoint_url, region"
        ) from None
    return sorted(fs.unstrip_protocol(p) for p in paths)


def option_keys(storage_options: dict) -> str:
    # Keys only: the values are credentials and must not reach logs.
    return "keys: " + ", ".join(sorted(storage_options)) if storage_options else "none given"


def _format_of(files: list[str], declared: str, where: str) -> str:
    if declared != "auto":
        fmt = declared
    else:
        formats = {FORMAT_BY_EXTENSION.get(data_suffix(f)) for f in files}
        if None in formats or len(formats) != 1:
            raise SourceError(
                f"data source {where!r}: cannot tell one format from the file extensions "
                f"({', '.join(sorted({data_suffix(f) or '(none)' for f in files}))}); "
                f"set `format:` on the source to one of parquet, json, text, arrow"
            )
        fmt = formats.pop()
    _check_compression(files, fmt, where)
    return fmt


def _check_compression(files: list[str], fmt: str, where: str) -> None:
    """Refuse, before any reading, files that no reader can decompress. Only our JSON/text reader
    decompresses: parquet and arrow compress inside the file, and datasets' builders would not inflate
    a `.parquet.gz`."""
    for f in files:
        try:
            codec = compression_of(f)
        except CompressionError as exc:
            raise SourceError(f"data source {where!r}: {exc}") from None
        if codec and fmt not in LINE_FORMATS:
            raise SourceError(
                f"data source {where!r}: {f} is a compressed {fmt} file; {fmt} files are compressed inside "
                f"(their columns), so decompress it (e.g. `gzip -d`) and point the source at the plain file"
            )


def open_source(src: SourceConfig, text_field: str) -> IterableDataset:
    """Open one source as a stream of rows (lazy: no data is read here beyond listing files).

    JSON/text sources give rows {text_field, BAD_COLUMN} (see data_pipelines.readers); `text_field` is
    the JSON key that holds each document's text (data.text_field)."""
    storage_options = dict(src.storage_options) if is_url(src.path) else {}
    files = _url_files(src.path, storage_options) if is_url(src.path) else _local_files(src.path)
    if files:
        fmt = _format_of(files, src.format, src.path)
        if fmt in LINE_FORMATS:
            return IterableDataset.from_generator(
                read_files,
                features=Features({text_field: Value("string"), BAD_COLUMN: Value("string")}),
                # `files` is the one list: datasets makes each file a shard.
                gen_kwargs={"files": files, "fmt": fmt, "text_field": text_field,
                            "storage_options": storage_options},
            )
        return load_dataset(fmt, data_files=files, split="train", streaming=True, storage_options=storage_options)
    if is_url(src.path):
        raise SourceError(
            f"data source {src.path!r} matches no files (storage_options {option_keys(storage_options)}). "
            f"Check the bucket and prefix; a folder URL lists files with the extensions "
            f"{', '.join(FORMAT_BY_EXTENSION)} (JSON-lines and text also compressed: .gz, .bz2, .xz, .zst)"
        )
    if _HUB_ID.match(src.path) and not Path(src.path).suffix:
        try:
            return load_dataset(src.path, split=src.split, streaming=True)
        except Exception as exc:  # the Hub raises many types; the user needs one message
            raise SourceError(
                f"data source {src.path!r} is not a local file or folder, and the Hugging Face Hub could not "
                f"open it ({type(exc).__name__}: {exc}). Check the path, or prepare local data with "
                f"`zeroray data prepare`."
            ) from exc
    raise SourceError(
        f"data source {src.path!r} does not exist or holds no files with a known extension "
        f"({', '.join(FORMAT_BY_EXTENSION)}; JSON-lines and text also compressed: .gz, .bz2, .xz, .zst). "
        f"Check the path, or create data with `zeroray data prepare`."
    )
