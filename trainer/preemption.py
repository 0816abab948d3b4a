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

Ranks see a request at different moments, but a checkpoint is a collective: `StopAgreement.agree()`
takes the maximum of every rank's flags in one all-reduce of three numbers per step, on a gloo group (CPU:
no device sync), so all ranks stop after the same step. Why every step rather than every N steps: the
notice is fixed in seconds, and N steps of a large model can take longer than that. Why blocking (about
0.4 ms with 2 ranks on one machine) rather than overlapped with the next step: the answer would come a
step later, and with long steps that step is what the notice lacks. The same all-reduce carries whether
any rank's background checkpoint publication is still running (trainer.checkpointing reports a publication at the
step where every rank's is done) and the latest clock among the ranks (decisions taken from time, such as
when to poll for a drain notice, are then the same on every rank).

A third way: a *drain notice* from the scheduler (a `NoticeSource` the launcher passes to
`trainer.loop.train`; under Ray Train, `launcher.ray_launch.ray_drain_notice`). The node is being taken
away with a deadline; the ranks checkpoint at the next step boundary and wait for the scheduler to restart
them elsewhere (trainer.checkpointing.Checkpointing says why they wait rather than train on).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.storage import stop_file, stop_reason

log = logging.getLogger("zeroray.preemption")


@dataclass(frozen=True)
class DrainNotice:
    """Nodes hosting ranks of this run are being drained: taken away at `deadline` (a spot reclaim, a
    scale-down). Times are UNIX seconds."""

    deadline: float | None  # when the nodes go; None: the scheduler gave none
    nodes: tuple[str, ...] = ()  # the scheduler's ids of the draining nodes
    ranks: tuple[int, ...] = ()  # the ranks on them
    hold_until: float | None = None
    """After their checkpoint the ranks wait for the scheduler to restart them; if it has not by this time,
    they train on. None: at once (a scheduler that does not restart on drains)."""

    def describe(self, now: float) -> str:
        left = "no deadline given" if self.deadline is None else f"deadline in {self.deadline - now:.1f} s"
        nodes = ", ".join(n[:12] for n in self.nodes) or "?"
        return f"node(s) {nodes} hosting rank(s) {', '.join(map(str, self.ranks)) or '?'} are draining ({left})"


NoticeSource = Callable[[], DrainNotice | None]
"""The launcher's drain notices. The loop calls it on every rank at the same step boundaries (about once a
second of the ranks' agreed clock), the same number of times on every rank, so it may be a barrier (Ray
Train's `get_preemption_info` is one); it must give every rank the same answer (Ray's broadcasts rank 0's)."""

NOTICE_POLL_S = 1.0  # Ray Train's PreemptionWatcher itself polls the cluster every 5 s by default


@dataclass(frozen=True)
class Agreed:
    """What every rank knows after one step's all-reduce."""

    stop: bool  # some rank was asked to stop
    publishing: bool  # some rank's background checkpoint publication is still running
    now: float  # the latest clock among the ranks (UNIX seconds)


class StopAgreement:
    """Whether to stop after this step, the same answer on every rank. Create it on every rank, in the
    same order relative to other process groups (it may create one)."""

    def __init__(self, run_root: Path, rank: int):
        self.path = stop_file(run_root)
        self.rank = rank
        self.signalled: str | None = None
        # The flag travels on CPU: on a NCCL run a small gloo group keeps the GPU stream out of it.
        self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._flags = torch.zeros(3, dtype=torch.float64)
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
        return self.agree().stop

    def agree(self, publishing: bool = False) -> Agreed:
        """Collective, once per step: whether any rank has a reason to stop, whether any rank's checkpoint
        publication (`publishing` here) is still running, and the latest clock; one all-reduce."""
        self._flags[0], self._flags[1], self._flags[2] = 1.0 if self.local_reason() else 0.0, float(publishing), time.time()
        dist.all_reduce(self._flags, op=dist.ReduceOp.MAX, group=self._group)
        stop, busy, now = self._flags.tolist()
        return Agreed(stop=bool(stop), publishing=bool(busy), now=now)

    def maximum(self, *values: float) -> list[float]:
        """Collective: the largest of each value over the ranks (an estimate and a clock every rank then
        decides from alike)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._group)
        return tensor.tolist()

    def served(self) -> None:
        """After the stop checkpoint: the request is done with (rank 0 removes the file)."""
        if self.rank == 0:
            self.path.unlink(missing_ok=True)
