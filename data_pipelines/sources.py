"""Turn a `SourceConfig` into a streaming Hugging Face `IterableDataset` of documents."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from datasets import IterableDataset, load_dataset

from data_pipelines.config import SourceConfig

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


class SourceError(ValueError):
    """A data source cannot be opened; the message says which and what to do."""


def _is_url(path: str) -> bool:
    return "://" in path


def _local_files(path: str) -> list[str]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = [str(f) for f in sorted(p.rglob("*")) if f.suffix in FORMAT_BY_EXTENSION and f.is_file()]
    elif any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(f))
    elif p.is_file():
        files = [str(p)]
    else:
        return []
    return files


def _format_of(files: list[str], declared: str, where: str) -> str:
    if declared != "auto":
        return declared
    formats = {FORMAT_BY_EXTENSION.get(Path(f).suffix) for f in files}
    if None in formats or len(formats) != 1:
        raise SourceError(
            f"data source {where!r}: cannot tell one format from the file extensions "
            f"({', '.join(sorted({Path(f).suffix or '(none)' for f in files}))}); "
            f"set `format:` on the source to one of parquet, json, text, arrow"
        )
    return formats.pop()


def _builder_kwargs(fmt: str) -> dict:
    # One example per file for plain text: documents must not be split at every newline.
    return {"sample_by": "document"} if fmt == "text" else {}


def open_source(src: SourceConfig) -> IterableDataset:
    """Open one source as a stream of rows (lazy: no data is read here beyond listing files)."""
    if _is_url(src.path):
        fmt = _format_of([src.path.rstrip("*")], src.format, src.path) if src.format == "auto" else src.format
        return load_dataset(
            fmt, data_files=src.path, split="train", streaming=True,
            storage_options=dict(src.storage_options), **_builder_kwargs(fmt),
        )
    files = _local_files(src.path)
    if files:
        fmt = _format_of(files, src.format, src.path)
        return load_dataset(fmt, data_files=files, split="train", streaming=True, **_builder_kwargs(fmt))
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
        f"({', '.join(FORMAT_BY_EXTENSION)}). Check the path, or create data with `zeroray data prepare`."
    )
