"""Our own reader for JSON-lines and plain-text files: every record comes out, usable or not.

Why not datasets' JSON/text builders: the JSON builder parses a file in blocks with pyarrow, and one
malformed line (or one file that vanishes mid-run) fails the whole stream, hours into a run; it
cannot say which records were bad, nor skip or count them. Here each record becomes one row
`{text_field: str | None, BAD_COLUMN: str | None}`; BAD_COLUMN names why a record is unusable (one
of BAD_KINDS) and the stream counts and skips such rows (data.bad_data).

`read_files` is the generator of `datasets.IterableDataset.from_generator` with the file list in
its `gen_kwargs`: datasets then shards the stream by file and resumes it (`state_dict`) by running
a file's generator again and skipping the rows already read. Files are opened through fsspec, so
local paths and URLs (s3://, gs://, memory://…) read alike, compressed ones (.gz, .zst…) included.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import fsspec

BAD_COLUMN = "__zeroray_bad__"
MALFORMED_JSON = "malformed_json"
UNDECODABLE_UTF8 = "undecodable_utf8"
NO_TEXT_FIELD = "no_text_field"
UNREADABLE_FILE = "unreadable_file"
BAD_KINDS = (MALFORMED_JSON, UNDECODABLE_UTF8, NO_TEXT_FIELD, UNREADABLE_FILE)
LINE_FORMATS = ("json", "text")

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
    with fsspec.open(url, "rb", compression="infer", **storage_options) as f:
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
