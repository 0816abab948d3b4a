"""Where a run directory lives: a local (or shared) folder, or a folder at an fsspec URL (s3://, gs://, …).

Both are a `Folder` with one interface, so the code above (checkpoints, uploads, run preparation) has no
backend branches. Every process works in a local copy of the run directory: for a local run that copy is
the folder itself, and copying a file or tree onto itself does nothing; for a URL it is
`output.cache_dir`, and whole files move up and down. Why a local working copy at all: DeepSpeed saves
checkpoints with `torch.save` to local paths and its universal converter reads local folders.

Object stores have no folder rename: a checkpoint counts once its manifest lands, which is written after
every other file, and `latest` is one object written last (a single PUT is atomic).
"""

from __future__ import annotations

import posixpath
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec

from trainer.storage.files import write_atomic


class RemoteStorageError(RuntimeError):
    """The remote run directory cannot be reached or written; the message says which and how to fix it."""


# is_url and option_keys as data_pipelines.sources has them for data sources: not imported from there, because
# that package loads `datasets` (about a second), and this one is imported by every light command too
# (`zeroray runs`, `zeroray plot`, the driver before its data check).
def is_url(path: str) -> bool:
    """A location at an fsspec URL (s3://…), not a local or shared folder."""
    return "://" in path


def option_keys(storage_options: dict) -> str:
    """For error messages: the keys only, since the values are credentials and must not reach logs."""
    return "keys: " + ", ".join(sorted(storage_options)) if storage_options else "none given"


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


class Folder(ABC):
    """A folder of files addressed by relative POSIX paths ("step_00000012/manifest.json")."""

    url: str
    per_node_copies: bool
    """True when each node works in a copy of its own (object storage): ranks on different nodes do not
    see each other's local files, so each node fetches what it reads. False for one folder every rank
    sees (a local run, or a shared file system)."""

    @abstractmethod
    def child(self, rel: str) -> Folder: ...

    @abstractmethod
    def read_text(self, rel: str) -> str | None:
        """The file's text, or None when it does not exist."""

    @abstractmethod
    def write_text(self, rel: str, text: str) -> None:
        """Create or replace one file whole: a reader sees the old text or the new."""

    @abstractmethod
    def sizes(self, rel: str = "") -> dict[str, int]:
        """Every file under `rel`, relative to it, with its size ({} when there is none)."""

    @abstractmethod
    def folders(self, prefix: str = "") -> list[str]:
        """Names of the sub-folders whose names start with `prefix`, sorted."""

    @abstractmethod
    def put(self, local: Path, rel: str) -> None:
        """Copy a local file, or a local folder with everything in it, to `rel`."""

    @abstractmethod
    def get(self, rel: str, local: Path) -> None:
        """Copy the file or folder at `rel` to the local path `local`."""

    @abstractmethod
    def remove(self, rel: str) -> None:
        """Delete a file or a folder with everything in it; nothing happens when it is missing."""

    @abstractmethod
    def rename(self, name: str) -> str:
        """Move the whole folder next to itself under `name`; returns where it went."""

    @abstractmethod
    def check_writable(self) -> None:
        """Fail early, with a message, when the folder cannot be written."""


@dataclass(frozen=True)
class LocalFolder(Folder):
    path: Path
    per_node_copies = False

    @property
    def url(self) -> str:
        return str(self.path)

    def child(self, rel: str) -> LocalFolder:
        return LocalFolder(self.path / rel)

    def _at(self, rel: str) -> Path:
        return self.path / rel if rel else self.path

    def read_text(self, rel: str) -> str | None:
        try:
            return self._at(rel).read_text()
        except FileNotFoundError:
            return None

    def write_text(self, rel: str, text: str) -> None:
        target = self._at(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, text)

    def sizes(self, rel: str = "") -> dict[str, int]:
        base = self._at(rel)
        return {f.relative_to(base).as_posix(): f.stat().st_size for f in base.rglob("*") if f.is_file()}

    def folders(self, prefix: str = "") -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(d.name for d in self.path.iterdir() if d.is_dir() and d.name.startswith(prefix))

    @staticmethod
    def _copy(source: Path, target: Path) -> None:
        if source.resolve() == target.resolve():
            return  # the working copy is this folder: nothing to move
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)

    def put(self, local: Path, rel: str) -> None:
        self._copy(Path(local), self._at(rel))

    def get(self, rel: str, local: Path) -> None:
        self._copy(self._at(rel), Path(local))

    def remove(self, rel: str) -> None:
        target = self._at(rel)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def check_writable(self) -> None:
        """Nothing to check up front for a local folder: creating it reports its own errors."""

    def rename(self, name: str) -> str:
        moved = self.path.with_name(name)
        self.path.rename(moved)
        return str(moved)


@dataclass(frozen=True)
class RemoteFolder(Folder):
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    per_node_copies = True

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

    def read_text(self, rel: str) -> str | None:
        try:
            return self.fs.cat_file(self._path(rel)).decode()
        except FileNotFoundError:
            return None

    def write_text(self, rel: str, text: str) -> None:
        self.fs.pipe_file(self._path(rel), text.encode())  # one PUT: atomic on object stores

    def sizes(self, rel: str = "") -> dict[str, int]:
        base = self._path(rel)
        self.fs.invalidate_cache()  # another process may have written since this one listed
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.relpath(path, base): int(info["size"]) for path, info in found.items()
                if info.get("type") != "directory"}

    def folders(self, prefix: str = "") -> list[str]:
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")
        return sorted(n for n in names if n.startswith(prefix))

    def put(self, local: Path, rel: str) -> None:
        local = Path(local)
        if local.is_dir():  # the trailing slash copies the folder's contents, not the folder into `rel`
            self.fs.put(f"{local}/", self._path(rel), recursive=True)
        else:
            self.fs.put_file(str(local), self._path(rel))

    def get(self, rel: str, local: Path) -> None:
        local, path = Path(local), self._path(rel)
        self.fs.invalidate_cache()
        if self.fs.isdir(path):
            local.mkdir(parents=True, exist_ok=True)
            self.fs.get(f"{path}/", f"{local}/", recursive=True)
        else:  # FileNotFoundError when it is missing, as for a local file
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(path, str(local))

    def remove(self, rel: str) -> None:
        path = self._path(rel)
        self.fs.invalidate_cache()
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def rename(self, name: str) -> str:
        """Object stores copy then delete: slow for a big run, but nothing is lost midway."""
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
