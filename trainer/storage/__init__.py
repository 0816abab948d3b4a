"""Run-directory storage, the one seam between zeroray and where a run's files live.

- `folder`: the `Folder` interface, a local folder (`LocalFolder`) or an fsspec URL (`RemoteFolder`)
- `config`: the run spec's `output` section (`OutputConfig.home` is the run's Folder)
- `run_dir`: the names of the files in a run directory
- `files`: atomic writes, fsync and checksums of local files
- `sync`: copying a rank's files to the home, and the run files a relaunch pulls back
- `stop_file`: the stop-file protocol that asks every rank to checkpoint and stop

Checkpoints (trainer.checkpoint) are published through the same interface.
"""

from trainer.storage.config import OutputConfig
from trainer.storage.files import fsync_tree, sha256, write_atomic
from trainer.storage.folder import (
    Folder,
    LocalFolder,
    RemoteFolder,
    RemoteStorageError,
    check_url,
    is_url,
)
from trainer.storage.run_dir import RunDir
from trainer.storage.stop_file import STOP_FILE, clear_stop_request, request_stop, stop_file, stop_reason
from trainer.storage.sync import pull_run_files, push_rank_files

__all__ = ["STOP_FILE", "Folder", "LocalFolder", "OutputConfig", "RemoteFolder", "RemoteStorageError", "RunDir",
           "check_url", "clear_stop_request", "fsync_tree", "is_url", "pull_run_files", "push_rank_files", "request_stop",
           "sha256", "stop_file", "stop_reason", "write_atomic"]
