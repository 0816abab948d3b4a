"""Copying a run directory's working copy up to its remote home (`output.dir: s3://…`).

Checkpoints have their own protocol (trainer.checkpoint); this module moves everything else: the
driver's files (spec, status, metrics, tensorboard, its node's logs) on a timer and at the end, and each
rank's own log after every checkpoint, so that a rank on a node without the driver leaves its log too.
An upload that fails is logged and retried at the next turn: a storage hiccup must not stop training.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from trainer.remote_folder import RemoteFolder
from trainer.run_dir import RunDir

log = logging.getLogger("zeroray.upload")

NOT_UPLOADED = ("checkpoints", "STOP")  # checkpoints go up on their own; STOP is a signal to this node


class RunDirUpload:
    """Driver side: uploads new or changed files every `every_s` seconds while open, and once at close."""

    def __init__(self, run: RunDir, remote: RemoteFolder, every_s: float = 30.0):
        self.run, self.remote, self.every_s = run, remote, every_s
        self._uploaded: dict[Path, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="zeroray-run-upload", daemon=True)
        self._failing = False

    def __enter__(self) -> RunDirUpload:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.push()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.push()

    def push(self) -> None:
        try:
            for f in sorted(self.run.root.rglob("*")):
                rel = f.relative_to(self.run.root)
                if rel.parts[0] in NOT_UPLOADED or not f.is_file() or f.name.endswith(".tmp"):
                    continue
                stat = f.stat()
                if self._uploaded.get(f) != (stat.st_size, stat.st_mtime_ns):
                    self.remote.upload(f, rel.as_posix())
                    self._uploaded[f] = (stat.st_size, stat.st_mtime_ns)
            self._failing = False
        except Exception as exc:  # the provider's own error types; retried at the next turn
            if not self._failing:
                log.warning("uploading the run directory to %s failed (%s: %s); retrying every %.0f s",
                            self.remote.url, type(exc).__name__, exc, self.every_s)
            self._failing = True


def push_rank_files(run: RunDir, remote: RemoteFolder | None, rank: int) -> None:
    """Worker side: this rank's log and placement records (they live on the rank's node only)."""
    if remote is None:
        return
    for f in (run.rank_log(rank), run.logs / f"placement_rank_{rank}.jsonl"):
        try:
            if f.is_file():
                remote.upload(f, f.relative_to(run.root).as_posix())
        except Exception as exc:  # a missing log upload must not fail the run
            log.warning("uploading %s to %s failed (%s: %s)", f, remote.url, type(exc).__name__, exc)


def pull_run_files(run: RunDir, remote: RemoteFolder) -> None:
    """Driver side, before a (re)launch: the remote run's spec, status and metrics into the working copy,
    so that a driver on another machine (the first one lost) resumes the same run and its progress."""
    for f in (run.spec, run.status, run.metrics):
        try:
            remote.download(f.relative_to(run.root).as_posix(), f)
        except FileNotFoundError:
            pass  # a new run, or one that stopped before writing it
