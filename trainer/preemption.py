"""Stopping a run on purpose: preemption (SIGTERM, a stop request) and, for tests, injected failures.

A preempted machine gets SIGTERM and a short notice (Kubernetes: terminationGracePeriodSeconds, 30 s by
default; GCP Spot 30 s; AWS Spot 2 min). The run should use it to checkpoint at the next step boundary
and exit cleanly, so the next launch loses no work. The request reaches the ranks in one of two ways:

- a stop file in the run directory (`request_stop`): what the `zeroray train` driver writes when it gets
  SIGTERM. Ray Train runs the training function in a thread of each worker actor, where Python cannot
  install a signal handler, and Ray kills the actors when the driver exits, so the driver forwards the
  stop through the run directory, which every node sees. Anyone may write it (`touch RUN_DIR/STOP`).
- SIGTERM to the trainer process itself, where the loop runs in the main thread (torchrun, `accelerate
  launch`, the `deepspeed` launcher).

Ranks see a request at different moments, but a checkpoint is a collective: `StopAgreement.agreed()`
takes the maximum of every rank's flag in one all-reduce of one integer per step, on a gloo group (CPU:
no device sync), so all ranks stop after the same step. Why every step rather than every N steps: the
notice is fixed in seconds, and N steps of a large model can take longer than that. Why blocking (about
0.4 ms with 2 ranks on one machine) rather than overlapped with the next step: the answer would come a
step later, and with long steps that step is what the notice lacks.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.checkpoint import Checkpoint, write_atomic

log = logging.getLogger("zeroray.preemption")

STOP_FILE = "STOP"


def stop_file(run_root: Path) -> Path:
    return Path(run_root) / STOP_FILE


def request_stop(run_root: Path, reason: str) -> None:
    """Ask the ranks of the run in `run_root` to checkpoint at the next step boundary and stop."""
    write_atomic(stop_file(run_root), json.dumps({"reason": reason, "time": time.time(), "pid": os.getpid()}) + "\n")


def clear_stop_request(run_root: Path) -> None:
    """A launch starts by removing a request that an earlier launch left, so it does not stop at once."""
    stop_file(run_root).unlink(missing_ok=True)


def _stop_reason(path: Path) -> str:
    try:
        return json.loads(path.read_text()).get("reason") or str(path)
    except (OSError, ValueError, AttributeError):
        return str(path)  # written by hand (`touch`), or half read


class StopAgreement:
    """Whether to stop after this step, the same answer on every rank. Create it on every rank, in the
    same order relative to other process groups (it may create one)."""

    def __init__(self, run_root: Path, rank: int):
        self.path = stop_file(run_root)
        self.rank = rank
        self.signalled: str | None = None
        # The flag travels on CPU: on a NCCL run a small gloo group keeps the GPU stream out of it.
        self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._previous_handler = None

    def watch_signals(self) -> None:
        """Turn SIGTERM into a stop request, where this thread may install handlers (the main thread)."""
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)

    def restore_signals(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def _on_signal(self, signum, frame) -> None:
        self.signalled = f"{signal.Signals(signum).name} to rank {self.rank} (pid {os.getpid()})"

    def local_reason(self) -> str | None:
        if self.signalled:
            return self.signalled
        return _stop_reason(self.path) if self.path.exists() else None

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank has a reason to stop."""
        self._flag.fill_(1 if self.local_reason() else 0)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(self._flag.item())

    def served(self) -> None:
        """After the stop checkpoint: the request is done with (rank 0 removes the file)."""
        if self.rank == 0:
            self.path.unlink(missing_ok=True)


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


# ---- failure injection (tests only: the spec's `debug` section) ----------------------------------


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
