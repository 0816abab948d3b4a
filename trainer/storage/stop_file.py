"""The stop-file protocol: `RUN_DIR/STOP` asks every rank of a run to checkpoint at the next step boundary
and stop. The driver writes it on SIGTERM (Ray Train runs the loop in a thread of each worker, where no
signal handler can be installed); anyone may write it by hand (`touch RUN_DIR/STOP`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from trainer.storage.files import write_atomic

STOP_FILE = "STOP"


def stop_file(run_root: Path) -> Path:
    return Path(run_root) / STOP_FILE


def request_stop(run_root: Path, reason: str) -> None:
    """Ask the ranks of the run in `run_root` to checkpoint at the next step boundary and stop."""
    write_atomic(stop_file(run_root), json.dumps({"reason": reason, "time": time.time(), "pid": os.getpid()}) + "\n")


def clear_stop_request(run_root: Path) -> None:
    """A launch starts by removing a request that an earlier launch left, so it does not stop at once."""
    stop_file(run_root).unlink(missing_ok=True)


def stop_reason(path: Path) -> str | None:
    """Why the stop file at `path` asks to stop; None when there is no such file."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("reason") or str(path)
    except (OSError, ValueError, AttributeError):
        return str(path)  # written by hand (`touch`), or half read
