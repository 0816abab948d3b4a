"""What happens around the optimizer steps, as a short list of hooks the step loop calls in order.

A hook sees every micro-batch's output (`micro_step`) and the end of every optimizer step (`step_end`),
with one `StepEnd` the hooks of that step share: the metrics hook leaves its record there, the stop hook
what every rank agreed (stop, a publication still running, a drain notice), the checkpoint hook reads them.
A new monitor is a new hook in `default_hooks`; the loop does not change.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from trainer.build import Training
from trainer.checkpoint import CheckpointStore
from trainer.checkpoint_notes import CheckpointNotes
from trainer.checkpointing import Checkpointing
from trainer.evaluation import Evaluator
from trainer.hook_base import CheckpointCallback, StepEnd, StepHook
from trainer.metrics import StepMetrics
from trainer.preemption import NOTICE_POLL_S, NoticeSource, StopAgreement
from trainer.samples import prompt_samples

__all__ = ["CheckpointCallback", "StepEnd", "StepHook", "default_hooks"]


class Metrics(StepHook):
    """Throughput, losses and the model's statistics; on evaluation steps the held-out loss and the
    continuations of eval.sample_prompts. Rank 0 appends the record to metrics.jsonl."""

    def __init__(self, t: Training, started: float):
        spec = t.spec
        self.meter = StepMetrics(spec, t.flops_per_token, t.precision, t.rank, t.world, t.device, started)
        self.evaluator = Evaluator(spec, t.rank, t.world, t.device) if spec.eval.sources else None
        self.last_record: dict | None = None

    def micro_step(self, out) -> None:
        self.meter.add(out)

    def step_end(self, t: Training, end: StepEnd) -> None:
        self.meter.step_done()
        evaluate = t.spec.eval.due(end.step, end.last)
        if self.meter.due(end.step) or evaluate:
            record = self.meter.record(end.step, t.engine, t.scheduler, t.data, self.evaluator if evaluate else None)
            if evaluate and t.spec.eval.sample_prompts:  # every rank decodes: under ZeRO-3 each forward gathers
                record["eval/samples"] = prompt_samples(t.engine.module, t.spec)
            end.record = self.last_record = record
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
    """Preemption: every rank learns, in one small all-reduce per step, whether any was asked to stop and
    whether any rank's checkpoint publication still runs; about once a second of the ranks' agreed clock it
    asks the launcher for a drain notice (the same steps on every rank: the source may be a barrier)."""

    def __init__(self, agreement: StopAgreement, publishing: Callable[[], bool] = lambda: False,
                 notices: NoticeSource | None = None):
        self.agreement, self.publishing, self.notices = agreement, publishing, notices
        self.next_poll = 0.0

    def step_end(self, t: Training, end: StepEnd) -> None:
        agreed = self.agreement.agree(self.publishing())
        end.stop, end.publishing = agreed.stop, agreed.publishing
        if self.notices is not None and agreed.now >= self.next_poll:
            self.next_poll = agreed.now + NOTICE_POLL_S
            end.notice = self.notices()


def default_hooks(t: Training, started: float, stop: StopAgreement, store: CheckpointStore,
                  on_checkpoint: CheckpointCallback | None, notices: NoticeSource | None = None) -> list[StepHook]:
    """The hooks of a training run, in the order they run after each step."""
    metrics = Metrics(t, started)
    hooks: list[StepHook] = [metrics]
    if t.spec.debug.active:
        hooks.append(FailureInjection(t.spec.debug))
    notes = CheckpointNotes(t.run, t.rank)
    notes.check_interrupted(t.step or None)
    checkpointing = Checkpointing(t, store, metrics, on_checkpoint, stop, notes)
    notices = notices if t.spec.trainer.drain_checkpoint else None
    return [*hooks, Stop(stop, checkpointing.publishing, notices), checkpointing]
