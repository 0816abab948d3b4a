"""What a step hook is (trainer.hooks holds the run's hooks): the loop calls `micro_step` after every
micro-batch and `step_end` after every optimizer step, with one `StepEnd` the hooks of that step share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trainer.build import Training
from trainer.checkpoint import Checkpoint
from trainer.preemption import DrainNotice

CheckpointCallback = Callable[[Checkpoint, dict], None]
"""Called on every rank after a checkpoint is published, at the same step on every rank, with the metrics
record of the checkpoint's step."""


@dataclass
class StepEnd:
    step: int
    last: bool
    record: dict | None = None  # the metrics record, on logged steps
    stop: bool = False  # every rank agreed to stop after this step's checkpoint
    publishing: bool = False  # some rank's background checkpoint publication is still running
    notice: DrainNotice | None = None  # the launcher's drain notice, on the steps it was asked for one


class StepHook:
    def micro_step(self, out) -> None:
        """After each micro-batch's forward, backward and engine step."""

    def step_end(self, t: Training, end: StepEnd) -> None:
        """After each optimizer step."""
