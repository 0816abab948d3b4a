"""Our own reader for JSON-lines and plain-text files: every record comes out, usable or not.

Why not datasets' JSON/text builders: the JSON builder parses a file in blocks with pyarrow, and one
malformed line (or one file that vanishes mid-run) fails the whole stream, hours into a run; it
cannot say which records were bad, nor skip or count them. Here each record becomes one row
`{text_field: str | None, BAD_COLUMN: str | None}`; BAD_COLUMN names why a record is unusable (one
of BAD_KINDS) and the stream counts and skips such rows (data.bad_data).

`read_files` is the generator of `datasets.IterableDataset.from_generator` with the file list in
its `gen_kwargs`: datasets then shards the stream by file and resumes it (`state_dict`) by running
a file's generator again and skipping the rows already read. Files are opened through fsspec, so
local paths and URLs (s3://, gs://, memory://…) read alike, and decompressed as they are read
(`open_file`): a compressed file streams, it is never inflated whole in memory or on disk.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import PurePosixPath

import fsspec

BAD_COLUMN = "__zeroray_bad__"
MALFORMED_JSON = "malformed_json"
UNDECODABLE_UTF8 = "undecodable_utf8"
NO_TEXT_FIELD = "no_text_field"
UNREADABLE_FILE = "unreadable_file"
BAD_KINDS = (MALFORMED_JSON, UNDECODABLE_UTF8, NO_TEXT_FIELD, UNREADABLE_FILE)
LINE_FORMATS = ("json", "text")

# File suffix → fsspec codec. Decompression is fsspec's own (gzip, bz2, lzma; zstd through Python 3.14's
# compression.zstd or the backports.zstd package, both raising on a truncated frame, as gzip does). We
# pick the codec ourselves rather than pass compression="infer", which looks only at the last suffix: it
# would read a .zip's first member or a .tar.gz's tar stream as if it were the text, and a missing zstd
# module would leave .zst files undecompressed bytes. Here those are refused before reading, by name.
COMPRESSION_BY_SUFFIX = {
    ".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".lzma": "lzma", ".zst": "zstd", ".zstd": "zstd",
}
_NEEDS = {"zstd": "the backports.zstd package on Python < 3.14 (`pip install backports.zstd`; zeroray's "
                  "dependencies include it)"}
# Compressions no reader here decompresses: recompress into one that is read.
_UNSUPPORTED = {".lz4": "lz4", ".br": "brotli", ".Z": "compress (.Z)", ".sz": "snappy", ".snappy": "snappy",
                ".lzo": "lzo"}
# Archives hold many files in one stream: decompressing one gives tar headers or a first member, not text.
_ARCHIVES = (".tar", ".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tgz", ".tbz2", ".txz", ".zip", ".7z", ".rar")
COMPRESSED_SUFFIXES = (*COMPRESSION_BY_SUFFIX, *_UNSUPPORTED)


def _register_zstd() -> None:
    # Recent fsspec registers zstd from compression.zstd / backports.zstd itself; older releases (our range
    # starts at 2024.6) only from the `zstandard` package. Register the stdlib-shaped module where it is missing.
    if "zstd" in fsspec.available_compressions():
        return
    try:
        from compression import zstd  # Python >= 3.14
    except ImportError:
        try:
            from backports import zstd
        except ImportError:
            return  # compression_of says what to install when a .zst file comes
    from fsspec.compression import register_compression

    register_compression("zstd", zstd.ZstdFile, "zst")


_register_zstd()


class CompressionError(ValueError):
    """A file is compressed in a way that cannot be read; the message names the file and what to do."""


def compression_of(path: str) -> str | None:
    """The fsspec codec that decompresses `path` (a local path or URL), from its suffix; None if it is not
    compressed. Raises CompressionError for an archive, an unsupported compression, or a codec whose module
    is not installed."""
    name = PurePosixPath(path.split("?")[0]).name
    archive = next((a for a in _ARCHIVES if name.endswith(a)), None)
    if archive:
        raise CompressionError(
            f"{path}: a {archive} archive holds many files in one stream, which is not one text or JSON-lines "
            f"file; extract it (`tar -xf` / `unzip`) and point the source at the extracted files (each may be "
            f"compressed on its own: .gz, .bz2, .xz, .zst)"
        )
    suffix = PurePosixPath(name).suffix
    if suffix in _UNSUPPORTED:
        raise CompressionError(
            f"{path}: {_UNSUPPORTED[suffix]} compression is not read here; recompress the file with one that is "
            f"(.gz, .bz2, .xz or .zst; e.g. `lz4 -dc f.lz4 | zstd -o f.zst`), or decompress it"
        )
    codec = COMPRESSION_BY_SUFFIX.get(suffix)
    if codec is not None and codec not in fsspec.available_compressions():
        raise CompressionError(f"{path}: reading {suffix} files needs {_NEEDS.get(codec, codec)}; install it, or "
                               f"decompress the file")
    return codec


def open_file(path: str, storage_options: dict | None = None):
    """`path` opened for binary reading, decompressed on the fly when its suffix says it is compressed."""
    codec = compression_of(path)
    if "://" not in path:
        # A local path goes to the local filesystem itself: fsspec.open would take a `::` in a file name
        # (Perl's man pages: `Dpkg::Deps.3perl.gz`) for a chain of URLs and look for `…/Dpkg`.
        return fsspec.filesystem("file").open(path, "rb", compression=codec)
    return fsspec.open(path, "rb", compression=codec, **(storage_options or {}))


log = logging.getLogger("zeroray.data")


def read_files(files: list[str], fmt: str, text_field: str, storage_options: dict) -> Iterator[dict]:
    """Rows of `files` in order: a JSON-lines file gives one row per non-blank line, a text file one row
    (the whole file is one document). A file that cannot be opened or read gives one UNREADABLE_FILE
    row (and a log line saying why) in place of its unread rest; the next file follows."""
    for url in files:
        units = _raw_units(url, fmt, storage_options)
        while True:
            # Only the I/O is guarded: parsing never raises, so a bug there is not passed off as bad data.
            try:
                unit = next(units)
            except StopIteration:
                break
            except Exception as exc:  # fsspec backends raise many types (OSError, botocore, aiohttp…)
                log.warning("data file %s could not be read, skipping the rest of it: %s: %s",
                            url, type(exc).__name__, exc)
                yield _bad(text_field, UNREADABLE_FILE)
                break
            if fmt == "text":
                yield _text_row(unit, text_field)
            else:
                yield from _json_rows(unit, text_field)


def _raw_units(url: str, fmt: str, storage_options: dict) -> Iterator[bytes]:
    """The undecoded records of one file: its non-blank lines (JSON lines), or its whole content (text,
    or a JSON file that is one array)."""
    # A truncated or corrupt compressed file raises here, mid-read (EOFError, zlib.error, BadGzipFile,
    # ZstdError…): read_files turns that into one UNREADABLE_FILE row after the records read before it.
    with open_file(url, storage_options) as f:
        if fmt == "text":
            content = f.read()
            if content:  # an empty file holds no document
                yield content
            return
        first = True
        for line in f:
            if not line.strip():
                continue
            if first and line.lstrip(b"\xef\xbb\xbf \t").startswith(b"["):
                # A file that is one JSON array (a .json file, maybe spread over lines) is one unit.
                yield line + f.read()
                return
            first = False
            yield line


def _json_rows(line: bytes, text_field: str) -> Iterator[dict]:
    try:
        value = json.loads(line.decode("utf-8-sig"))  # -sig: a byte-order mark may open the file
    except UnicodeDecodeError:
        yield _bad(text_field, UNDECODABLE_UTF8)
        return
    except (ValueError, RecursionError):
        yield _bad(text_field, MALFORMED_JSON)
        return
    # A line holding a JSON array is a list of records, as datasets reads a .json file that is one array.
    for record in value if isinstance(value, list) else [value]:
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            yield _bad(text_field, NO_TEXT_FIELD)
        elif not _encodable(text):  # JSON escapes can spell lone surrogates, which no tokenizer takes
            yield _bad(text_field, UNDECODABLE_UTF8)
        else:
            yield {text_field: text, BAD_COLUMN: None}


def _text_row(content: bytes, text_field: str) -> dict:
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        return _bad(text_field, UNDECODABLE_UTF8)
    # Universal newlines, as datasets' text builder (and Python's text mode) reads them.
    return {text_field: text.replace("\r\n", "\n").replace("\r", "\n"), BAD_COLUMN: None}


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad(text_field: str, kind: str) -> dict:
    return {text_field: None, BAD_COLUMN: kind}
