"""`zeroray train`'s driver side of preemption: SIGTERM to the driver becomes a stop request to the ranks."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from trainer.checkpoint import Checkpoint
from trainer.storage import clear_stop_request, request_stop


class DriverStop:
    """`zeroray train`'s driver: on SIGTERM, ask the workers to checkpoint and stop; if they have not
    within `grace_s`, give up on that checkpoint (KeyboardInterrupt in the main thread, as Ctrl-C does).
    A second SIGTERM gives up at once. A context manager; a no-op outside the main thread."""

    def __init__(self, run_root: Path, grace_s: float, announce=print):
        self.run_root, self.grace_s, self.announce = Path(run_root), grace_s, announce
        self.requested: str | None = None
        self._previous = None
        self._timer: threading.Timer | None = None

    def __enter__(self) -> DriverStop:
        clear_stop_request(self.run_root)
        if threading.current_thread() is threading.main_thread():
            # Replaces Ray's own handler (ray.init installs one that exits at once) while training runs.
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        clear_stop_request(self.run_root)  # served, or never seen by workers that had already finished

    def stopped_early(self, latest: Checkpoint | None, max_steps: int) -> str | None:
        """After training returned: what to tell the user when it stopped on request before the end."""
        if self.requested is None or (latest is not None and latest.step >= max_steps):
            return None
        where = f"after step {latest.step}; checkpoint {latest.path}" if latest else "before the first checkpoint"
        return (f"stopped on {self.requested} {where}. Resume with `zeroray resume {self.run_root}` (or run the "
                f"same `zeroray train` command again)")

    def _on_signal(self, signum, frame) -> None:
        import _thread

        if self.requested is not None:
            _thread.interrupt_main()
            return
        self.requested = f"{signal.Signals(signum).name} to the driver (pid {os.getpid()})"
        request_stop(self.run_root, self.requested)
        self.announce(f"{self.requested}: the workers checkpoint at the next step boundary and stop "
                      f"(waiting up to trainer.preemption_grace_s={self.grace_s:g} s)")
        self._timer = threading.Timer(self.grace_s, _thread.interrupt_main)
        self._timer.daemon = True
        self._timer.start()
