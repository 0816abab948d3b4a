"""A folder at an fsspec URL (s3://, gs://, az://, …): where a run directory lives when `output.dir` is a URL.

Why files are copied rather than written there directly: DeepSpeed saves checkpoints with `torch.save`
to local paths and its universal converter reads local folders, so every rank works in a local copy
of the run directory (`output.cache_dir`) and this class moves whole files up and down. Object stores
have no folder rename: a checkpoint counts once its manifest lands, which is written after every
other file, and `latest` is one object written last (a single PUT is atomic).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec

from data_pipelines.sources import option_keys


class RemoteStorageError(RuntimeError):
    """The remote run directory cannot be reached or written; the message says which and how to fix it."""


# Filesystems that each process holds on its own: ranks and the driver would not see one another's files.
PROCESS_LOCAL_PROTOCOLS = ("memory",)


def check_url(url: str) -> None:
    """Fail early on a URL no process could share: an unknown scheme, a missing fsspec driver, memory://."""
    protocol = url.split("://", 1)[0]
    if protocol in PROCESS_LOCAL_PROTOCOLS:
        raise ValueError(f"{url!r}: {protocol}:// lives inside one process; workers would not see the run. "
                         f"Use object storage (s3://, gs://, az://) or a shared folder")
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ValueError(f"{url!r}: fsspec knows no storage {protocol!r}; use s3://, gs://, az://, … or a "
                         f"local folder") from None
    except ImportError as exc:
        extra = " (pip install 'zeroray[s3]')" if protocol in ("s3", "s3a") else ""
        raise ValueError(f"{url!r} needs the fsspec driver for {protocol}://, which is not installed{extra}: "
                         f"{exc}") from None


@dataclass(frozen=True)
class RemoteFolder:
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def _fs_and_root(self):
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs, root.rstrip("/")

    @property
    def fs(self):
        return self._fs_and_root[0]

    @property
    def root(self) -> str:
        """The folder's path inside its filesystem (no scheme): what pyarrow/Ray take with `fs`."""
        return self._fs_and_root[1]

    def child(self, rel: str) -> RemoteFolder:
        return RemoteFolder(f"{self.url.rstrip('/')}/{rel}", self.storage_options)

    def _path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    # ---- reading ----------------------------------------------------------------------------
    def read_text(self, rel: str) -> str | None:
        """The file's text, or None when it does not exist."""
        try:
            return self.fs.cat_file(self._path(rel)).decode()
        except FileNotFoundError:
            return None

    def sizes(self, rel: str = "") -> dict[str, int]:
        """Every file under `rel`, relative to it, with its size ({} when there is none)."""
        base = self._path(rel)
        self.fs.invalidate_cache()  # another process may have written since this one listed
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.relpath(path, base): int(info["size"]) for path, info in found.items()
                if info.get("type") != "directory"}

    def folders(self, prefix: str = "") -> list[str]:
        """Names of the sub-folders whose names start with `prefix`, sorted."""
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")
        return sorted(n for n in names if n.startswith(prefix))

    def download(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self._path(rel), str(local))

    def download_tree(self, rel: str, local_dir: Path) -> None:
        for name in self.sizes(rel):
            self.download(posixpath.join(rel, name), local_dir / name)

    # ---- writing ----------------------------------------------------------------------------
    def upload(self, local: Path, rel: str) -> None:
        self.fs.put_file(str(local), self._path(rel))

    def upload_tree(self, local_dir: Path, rel: str) -> None:
        for f in sorted(local_dir.rglob("*")):
            if f.is_file():
                self.upload(f, posixpath.join(rel, f.relative_to(local_dir).as_posix()))

    def write_text(self, rel: str, text: str) -> None:
        self.fs.pipe_file(self._path(rel), text.encode())

    def remove(self, rel: str) -> None:
        """Delete a file or a folder with everything in it; nothing happens when it is missing."""
        path = self._path(rel)
        self.fs.invalidate_cache()
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def rename(self, name: str) -> str:
        """Move the whole folder next to itself under `name`; returns the new URL. Object stores copy
        then delete: slow for a big run, but nothing is lost midway."""
        self.fs.mv(self.root, posixpath.join(posixpath.dirname(self.root), name), recursive=True)
        return f"{self.url.rstrip('/').rsplit('/', 1)[0]}/{name}"

    def check_writable(self) -> None:
        """Write and delete one small object: wrong credentials, a missing bucket or a dead endpoint
        fail here, on the driver, with a message, instead of in every worker after the cluster started."""
        probe = ".zeroray-write-check"
        try:
            self.write_text(probe, "ok\n")
            self.remove(probe)
        except Exception as exc:  # botocore, gcsfs, adlfs and aiohttp each raise their own types
            raise RemoteStorageError(
                f"output.dir {self.url} cannot be written ({type(exc).__name__}: {exc}). Check that the bucket "
                f"exists, the credentials may write to it, and the endpoint is right: output.storage_options "
                f"({option_keys(self.storage_options)}) or the provider's environment variables (AWS_* for s3://)"
            ) from None
