"""What happens around the optimizer steps, as a short list of hooks the step loop calls in order.

A hook sees every micro-batch's output (`micro_step`) and the end of every optimizer step (`step_end`),
with one `StepEnd` the hooks of that step share: the metrics hook leaves its record there, the stop hook
says whether the run stops, the checkpoint hook reads both. A new monitor is a new hook in
`default_hooks`; the loop does not change.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from trainer.build import Training
from trainer.checkpoint import Checkpoint, CheckpointStore, rng_state
from trainer.evaluation import Evaluator
from trainer.metrics import StepMetrics
from trainer.preemption import StopAgreement
from trainer.storage import push_rank_files

log = logging.getLogger("zeroray.trainer")

CheckpointCallback = Callable[[Checkpoint, dict], None]
"""Called on every rank after a checkpoint is published, with the latest metrics record."""


@dataclass
class StepEnd:
    step: int
    last: bool
    record: dict | None = None  # the metrics record, on logged steps
    stop: bool = False  # every rank agreed to stop after this step's checkpoint


class StepHook:
    def micro_step(self, out) -> None:
        """After each micro-batch's forward, backward and engine step."""

    def step_end(self, t: Training, end: StepEnd) -> None:
        """After each optimizer step."""


class Metrics(StepHook):
    """Throughput, losses and the model's statistics; the held-out loss on evaluation steps. Rank 0
    appends the record to metrics.jsonl."""

    def __init__(self, t: Training, started: float):
        spec = t.spec
        self.meter = StepMetrics(spec, t.flops_per_token, t.precision, t.rank, t.world, t.device, started)
        self.evaluator = Evaluator(spec, t.rank, t.world, t.device) if spec.eval.sources else None
        self.last_record: dict | None = None

    def micro_step(self, out) -> None:
        self.meter.add(out)

    def step_end(self, t: Training, end: StepEnd) -> None:
        self.meter.step_done()
        evaluate = self.evaluator is not None and self.evaluator.due(end.step, end.last)
        if self.meter.due(end.step) or evaluate:
            end.record = self.last_record = self.meter.record(
                end.step, t.engine, t.scheduler, t.data, self.evaluator if evaluate else None)
            if t.rank == 0:
                with open(t.run.metrics, "a") as f:
                    f.write(json.dumps(end.record) + "\n")


class FailureInjection(StepHook):
    """Test-only (the spec's `debug` section)."""

    def __init__(self, debug):
        self.debug = debug

    def step_end(self, t: Training, end: StepEnd) -> None:
        from trainer.failure_injection import after_step

        after_step(self.debug, end.step, t.rank, t.run.root)


class Stop(StepHook):
    """Preemption: every rank learns, in one small all-reduce per step, whether any was asked to stop."""

    def __init__(self, agreement: StopAgreement):
        self.agreement = agreement

    def step_end(self, t: Training, end: StepEnd) -> None:
        end.stop = self.agreement.agreed()


class Checkpointing(StepHook):
    """Every trainer.checkpoint_every steps, after the last step and before a stop: publish a checkpoint,
    copy this rank's log to the run's home, tell the launcher. The time it takes is left out of
    throughput."""

    def __init__(self, store: CheckpointStore, metrics: Metrics, on_checkpoint: CheckpointCallback | None):
        self.store, self.metrics, self.on_checkpoint = store, metrics, on_checkpoint

    def step_end(self, t: Training, end: StepEnd) -> None:
        every = t.spec.trainer.checkpoint_every
        if not (end.last or end.stop or (every and end.step % every == 0)):
            return
        saving_since = time.perf_counter()
        published = self.store.save(
            t.engine,
            end.step,
            rank_state={"data": t.data.state_dict(), "rng": rng_state()},
            run_files={"spec.yaml": t.spec.to_yaml(), "trainer_state.json": json.dumps({"step": end.step})},
            keep_last=t.spec.output.keep_last,
        )
        push_rank_files(t.run, t.spec.output.home, t.rank)
        if self.on_checkpoint is not None:
            self.on_checkpoint(published, self.metrics.last_record or {"step": end.step})
        self.metrics.meter.exclude(time.perf_counter() - saving_since)
        if t.rank == 0:
            log.info("checkpoint at step %d", end.step)


def default_hooks(t: Training, started: float, stop: StopAgreement, store: CheckpointStore,
                  on_checkpoint: CheckpointCallback | None) -> list[StepHook]:
    """The hooks of a training run, in the order they run after each step."""
    metrics = Metrics(t, started)
    hooks: list[StepHook] = [metrics]
    if t.spec.debug.active:
        hooks.append(FailureInjection(t.spec.debug))
    return [*hooks, Stop(stop), Checkpointing(store, metrics, on_checkpoint)]
