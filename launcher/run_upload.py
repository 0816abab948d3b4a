"""The driver's upload of a run directory's working copy to its remote home (`output.dir: s3://…`).

Spec, status, metrics, tensorboard files and the driver node's logs go up on a timer and at the end;
checkpoints go up on their own (trainer.checkpoint). An upload that fails is logged and retried at the
next turn: a storage hiccup must not stop training.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from trainer.storage import STOP_FILE, RemoteFolder, RunDir

log = logging.getLogger("zeroray.upload")

NOT_UPLOADED = ("checkpoints", STOP_FILE)  # checkpoints go up on their own; STOP is a signal to this node


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
                    self.remote.put(f, rel.as_posix())
                    self._uploaded[f] = (stat.st_size, stat.st_mtime_ns)
            self._failing = False
        except Exception as exc:  # the provider's own error types; retried at the next turn
            if not self._failing:
                log.warning("uploading the run directory to %s failed (%s: %s); retrying every %.0f s",
                            self.remote.url, type(exc).__name__, exc, self.every_s)
            self._failing = True
