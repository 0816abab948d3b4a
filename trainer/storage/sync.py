"""Copying run files between a node's working copy and the run's home (`output.dir`, trainer.storage.folder).

Checkpoints have their own protocol (trainer.checkpoint); the driver's periodic upload is the driver's
(launcher.run_upload). Here: each rank's own log after every checkpoint, so that a rank on a node without
the driver leaves its log too, and the run files a relaunch needs. For a local run the home is the
working copy itself and these copies do nothing.
"""

from __future__ import annotations

import logging

from trainer.storage.folder import Folder
from trainer.storage.run_dir import RunDir

log = logging.getLogger("zeroray.upload")

def push_rank_files(run: RunDir, home: Folder, rank: int) -> None:
    """Worker side: this rank's log and placement records (they live on the rank's node only)."""
    for f in (run.rank_log(rank), run.logs / f"placement_rank_{rank}.jsonl"):
        try:
            if f.is_file():
                home.put(f, f.relative_to(run.root).as_posix())
        except Exception as exc:  # a missing log upload must not fail the run
            log.warning("uploading %s to %s failed (%s: %s)", f, home.url, type(exc).__name__, exc)


def pull_run_files(run: RunDir, home: Folder) -> None:
    """Driver side, before a (re)launch: the remote run's spec, status and metrics into the working copy,
    so that a driver on another machine (the first one lost) resumes the same run and its progress."""
    for f in (run.spec, run.status, run.metrics):
        try:
            home.get(f.relative_to(run.root).as_posix(), f)
        except FileNotFoundError:
            pass  # a new run, or one that stopped before writing it
