"""Test-only failure injection (the spec's `debug` section): slow steps, and a rank that fails once.

Registered as a step hook only when the section asks for something (trainer.hooks), so a real run has
no trace of it in its loop."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

from trainer.storage import write_atomic

log = logging.getLogger("zeroray.preemption")


class InjectedFailure(RuntimeError):
    """Raised by `debug.fail_mode: raise`."""


def injected_failure_marker(run_root: Path, step: int) -> Path:
    return Path(run_root) / f"injected_failure_step_{step:08d}.json"


def after_step(debug, step: int, rank: int, run_root: Path) -> None:
    """The spec's test-only `debug` section, after each optimizer step: slow the run down, and fail this
    rank right after step `step` if told to, once: the marker file (written first, with the time)
    keeps the restarted run from failing again."""
    if debug.step_delay_s:
        time.sleep(debug.step_delay_s)
    if step not in debug.fail_at_steps or rank != debug.fail_rank:
        return
    marker = injected_failure_marker(run_root, step)
    if marker.exists():
        return
    write_atomic(marker, json.dumps({"step": step, "rank": rank, "mode": debug.fail_mode, "time": time.time(),
                                     "pid": os.getpid()}) + "\n")
    log.warning("debug.fail_at_steps: rank %d fails (%s) after step %d", rank, debug.fail_mode, step)
    for handler in logging.getLogger("zeroray").handlers:
        handler.flush()
    if debug.fail_mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFailure(f"debug.fail_at_steps: injected failure of rank {rank} after step {step}")
