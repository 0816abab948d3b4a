"""Stopping a run on purpose: preemption (SIGTERM, a stop request), agreed by every rank.

A preempted machine gets SIGTERM and a short notice (Kubernetes: terminationGracePeriodSeconds, 30 s by
default; GCP Spot 30 s; AWS Spot 2 min). The run should use it to checkpoint at the next step boundary
and exit cleanly, so the next launch loses no work. The request reaches the ranks in one of two ways:

- a stop file in the run directory (trainer.storage.stop_file): what the `zeroray train` driver writes when it gets
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

import logging
import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.storage import stop_file, stop_reason

log = logging.getLogger("zeroray.preemption")

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
        return self.signalled or stop_reason(self.path)

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank has a reason to stop."""
        self._flag.fill_(1 if self.local_reason() else 0)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(self._flag.item())

    def served(self) -> None:
        """After the stop checkpoint: the request is done with (rank 0 removes the file)."""
        if self.rank == 0:
            self.path.unlink(missing_ok=True)
