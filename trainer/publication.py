"""A checkpoint between its two parts: `Staged` (written to local staging on every rank by
CheckpointStore.stage) and its `Publication` (CheckpointStore.publish), run on the step path or in a
background thread while training goes on (trainer.async_checkpoint)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from trainer.checkpoint import Checkpoint, CheckpointError, CheckpointStore, Staged

log = logging.getLogger("zeroray.checkpoint")


@dataclass
class Publication:
    """One checkpoint's publication, run where the caller says: inline (`run`) or in a thread (`start`).
    Each rank has its own, of the same checkpoint; they meet in the collectives of `group`."""

    store: CheckpointStore
    staged: Staged
    keep_last: int
    group: object = None  # the process group of its collectives; None = the world's (only on the step path)
    before_manifest: Callable[[Staged], None] | None = None  # test-only failure injection
    after: Callable[[], None] | None = None  # this rank's own follow-up once published (its log upload)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    checkpoint: Checkpoint | None = None
    error: str | None = None
    _thread: threading.Thread | None = None

    def run(self) -> Publication:
        try:
            self.checkpoint = self.store.publish(self.staged, self.keep_last, self.group, self.before_manifest)
            if self.after is not None:
                self.after()
        except CheckpointError as exc:
            self.error = str(exc)
        except Exception as exc:  # not agreed: the other ranks may still wait; the log says which rank
            log.exception("publishing the checkpoint of step %d failed on rank %d", self.staged.step, self.store.rank)
            self.error = f"rank {self.store.rank}: {type(exc).__name__}: {exc}"
        self.finished = time.time()
        return self

    def start(self) -> Publication:
        self._thread = threading.Thread(target=self.run, name=f"zeroray-publish-{self.staged.tag}", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def inline(self) -> bool:
        """Run on the caller's thread (the step path), not in the background."""
        return self._thread is None

    def wait(self) -> Publication:
        if self._thread is not None:
            self._thread.join()
        return self

    @property
    def seconds(self) -> float:
        """Staging plus publication, as the next checkpoint's estimate."""
        return self.staged.staged_s + ((self.finished or time.time()) - self.started)
