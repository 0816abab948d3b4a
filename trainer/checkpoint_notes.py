"""The `checkpoints` section of a run's status.json: what `zeroray runs` and a user reading the file see of
the checkpoints (the latest, the one being written, drains and failures), written by rank 0 as they happen."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from trainer.checkpoint import Checkpoint, tag_for
from trainer.storage import RunDir, write_atomic

log = logging.getLogger("zeroray.trainer")


class CheckpointNotes:
    """The `checkpoints` section of the run's status.json (the launcher writes the rest of the file and keeps
    this section): the latest published checkpoint, the one being written, and what went wrong (a drain with
    no time for a checkpoint, a failed or interrupted one). Written by rank 0 only, on the step path."""

    KEEP = 20  # events kept

    def __init__(self, run: RunDir, rank: int):
        self.path, self.active = run.status, rank == 0

    def _update(self, change: Callable[[dict], None]) -> None:
        if not self.active:
            return
        try:
            status = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            status = {}
        section = status.get("checkpoints") or {}
        change(section)
        status["checkpoints"] = section
        try:
            write_atomic(self.path, json.dumps(status) + "\n")
        except OSError as exc:  # a full disk must not stop training here; the log has the same lines
            log.warning("updating %s failed (%s)", self.path, exc)

    def started(self, step: int, reason: str) -> None:
        self._update(lambda s: s.update(in_progress={"step": step, "reason": reason, "started": time.time()}))

    def published(self, ckpt: Checkpoint, reason: str, seconds: float, blocking_s: float) -> None:
        def change(s: dict) -> None:
            s["latest"] = {"step": ckpt.step, "tag": ckpt.tag, "reason": reason, "time": time.time(),
                           "seconds": round(seconds, 3), "step_path_s": round(blocking_s, 3)}
            s["in_progress"] = None

        self._update(change)

    def event(self, kind: str, step: int, message: str, **fields) -> None:
        def change(s: dict) -> None:
            s["events"] = [*s.get("events", []), {"event": kind, "step": step, "time": time.time(),
                                                  "message": message, **fields}][-self.KEEP:]
            if kind in ("checkpoint_failed", "checkpoint_interrupted"):
                s["in_progress"] = None

        self._update(change)

    def check_interrupted(self, resumed: int | None) -> None:
        """At the start of an attempt: a checkpoint the last one began and never published (the workers were
        stopped or lost while it was written: a second drain notice moved the deadline, a crash) is said so."""
        if not self.active:
            return
        try:
            pending = (json.loads(self.path.read_text()).get("checkpoints") or {}).get("in_progress")
        except (OSError, ValueError, AttributeError):
            return
        if not pending or pending.get("step") == resumed:
            return
        message = (f"the {pending.get('reason', '')} checkpoint of step {pending.get('step')} begun at "
                   f"{time.strftime('%H:%M:%S', time.localtime(pending.get('started', 0)))} was never published "
                   f"(the workers were stopped or lost while it was written); resuming from "
                   f"{tag_for(resumed) if resumed else 'the start'}")
        log.warning(message)
        self.event("checkpoint_interrupted", pending.get("step", 0), message, reason=pending.get("reason"))
