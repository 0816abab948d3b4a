"""The checkpoint hook: periodic, final, stop and drain checkpoints, staged on the step path and published
in the background (trainer.async_checkpoint), with what goes wrong with them said in the log and status.json."""

from __future__ import annotations

import errno
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

from trainer.build import Training
from trainer.checkpoint import CheckpointError, CheckpointStore, tag_for
from trainer.checkpoint_notes import CheckpointNotes
from trainer.hook_base import CheckpointCallback, StepEnd, StepHook
from trainer.preemption import DrainNotice, StopAgreement
from trainer.publication import Publication, Staged
from trainer.rng import rng_state
from trainer.storage import push_rank_files

if TYPE_CHECKING:
    from trainer.hooks import Metrics

log = logging.getLogger("zeroray.trainer")


@dataclass
class _InFlight:
    publication: Publication
    reason: str  # periodic, final, stop, drain
    record: dict  # the metrics record Ray's report gets


# A drain checkpoint is attempted when 1.25 × the last checkpoint's duration (staging and publication, measured
# in this attempt) + 1 s fits before the deadline. The drained node's ranks hold ZeRO shards of their own: a
# checkpoint not published when the node goes is lost, so one that cannot finish is not begun (and said so).
DRAIN_SAFETY, DRAIN_MARGIN_S = 1.25, 1.0
FAILED_IN_A_ROW = 3  # failed checkpoints in a row that stop the run


class Checkpointing(StepHook):
    """Every trainer.checkpoint_every steps, after the last step, before a stop and on a drain notice: stage
    a checkpoint on the step path, publish it (in the background with trainer.async_checkpoint), and once
    every rank's publication is done, at the same step on every rank, tell the launcher. The time on the step
    path is left out of throughput.

    A checkpoint that fails to publish leaves `latest` at the one before (trainer.checkpoint), is logged and
    recorded in status.json, and training goes on: the next checkpoint tries again, as a storage hiccup must
    not stop training. It stops (CheckpointError) when the final or a stop checkpoint fails, or
    FAILED_IN_A_ROW in a row do, as then too much work hangs on storage that does not work."""

    def __init__(self, t: Training, store: CheckpointStore, metrics: Metrics, on_checkpoint: CheckpointCallback | None,
                 agreement: StopAgreement, notes: CheckpointNotes):
        self.store, self.metrics, self.on_checkpoint = store, metrics, on_checkpoint
        self.agreement, self.notes, self.debug = agreement, notes, t.spec.debug
        self.background = t.spec.trainer.async_checkpoint
        # A background publication's collectives (listings, checksums, the barriers between its steps) run in a
        # thread while the step loop runs the training's (gradient reductions, the stop agreement). On one process
        # group, two threads' collectives would pair up in different orders on different ranks: a hang or wrong
        # data. So they get a group of their own, gloo (small CPU messages, no device stream; made here, where
        # every rank builds its hooks in the same order). Marker files instead of collectives would not reach
        # ranks on other nodes without a shared disk (object storage has no rename and lists slowly).
        self.group = dist.new_group(backend="gloo") if self.background and t.world > 1 else None
        self.pending: _InFlight | None = None
        self.published_step: int | None = t.step or None  # the checkpoint resumed from is published
        self.last_seconds = 0.0  # the last checkpoint's staging + publication: the estimate for a drain
        self.failed_in_a_row = 0
        self.drain_seen = False

    def publishing(self) -> bool:
        """Whether this rank's publication still runs (the stop hook's all-reduce tells every rank)."""
        return self.pending is not None and self.pending.publication.running

    def step_end(self, t: Training, end: StepEnd) -> None:
        if self.pending is not None and not end.publishing:
            self._settle(t)  # every rank's publication had finished at this step's agreement
        if end.notice is not None and not self.drain_seen:
            self._drain(t, end)
        every = t.spec.trainer.checkpoint_every
        if not (end.last or end.stop or (every and end.step % every == 0)) or self.published_step == end.step:
            return
        reason = "final" if end.last else "stop" if end.stop else "periodic"
        self._checkpoint(t, end.step, reason, wait=end.last or end.stop or not self.background)

    # ---- one checkpoint ---------------------------------------------------------------------
    def _checkpoint(self, t: Training, step: int, reason: str, wait: bool) -> None:
        """Stage the checkpoint of `step` and publish it, in the background unless `wait`. Collective."""
        since = time.perf_counter()
        self._wait(t)  # one checkpoint in flight at most: the next waits for it
        room = self.store.free_space_error(int(self.store.last_bytes * 1.1)) if self.store.last_bytes else None
        if self.agreement.maximum(float(room is not None))[0]:  # no rank starts what another cannot finish
            self._failed(step, reason, f"no room for it: {room or 'on another rank (its log says)'}")
            self.metrics.meter.exclude(time.perf_counter() - since)
            return
        self.notes.started(step, reason)
        staged = self.store.stage(
            t.engine,
            step,
            rank_state={"data": t.data.state_dict(), "rng": rng_state()},
            run_files={"spec.yaml": t.spec.to_yaml(), "trainer_state.json": json.dumps({"step": step})},
        )
        publication = Publication(
            self.store, staged, t.spec.output.keep_last, self.group,
            before_manifest=self._injected if (self.debug.checkpoint_delay_s or self.debug.fail_checkpoint_at_steps)
            else None,
            after=lambda: push_rank_files(t.run, t.spec.output.home, t.rank),  # the log says what happened
        )
        self.pending = _InFlight(publication, reason, self.metrics.last_record or {"step": step})
        if wait:
            publication.run()
            self._settle(t)
        else:
            publication.start()
        self.metrics.meter.exclude(time.perf_counter() - since)

    def _wait(self, t: Training) -> None:
        """Until this rank's publication is done, then settle it: at the same step on every rank."""
        if self.pending is not None:
            self.pending.publication.wait()
            self._settle(t)

    def _settle(self, t: Training) -> None:
        done, self.pending = self.pending, None
        publication = done.publication.wait()
        self.last_seconds = publication.seconds
        step = publication.staged.step
        if publication.error is not None:
            self._failed(step, done.reason, publication.error)
            return
        self.published_step, self.failed_in_a_row = step, 0
        self.notes.published(publication.checkpoint, done.reason, publication.seconds,
                             publication.seconds if publication.inline else publication.staged.staged_s)
        if self.on_checkpoint is not None:
            self.on_checkpoint(publication.checkpoint, done.record)  # a barrier under Ray: here on every rank
        if t.rank == 0 and publication.inline:
            log.info("checkpoint at step %d (%s): published in %.2f s on the step path", step, done.reason,
                     publication.seconds)
        elif t.rank == 0:
            log.info("checkpoint at step %d (%s): %.2f s on the step path, published in the background after "
                     "%.2f s", step, done.reason, publication.staged.staged_s, publication.seconds)

    def _failed(self, step: int, reason: str, error: str) -> None:
        self.failed_in_a_row += 1
        latest = tag_for(self.published_step) if self.published_step else "none yet"
        message = f"the {reason} checkpoint of step {step} was not published: {error}; `latest` stays {latest}"
        self.notes.event("checkpoint_failed", step, message, reason=reason)
        if reason in ("final", "stop") or self.failed_in_a_row >= FAILED_IN_A_ROW:
            why = (f"the {reason} checkpoint must land" if reason in ("final", "stop")
                   else f"{self.failed_in_a_row} checkpoints in a row failed")
            raise CheckpointError(f"{message}. Stopping: {why}; check the storage of the run directory")
        log.error("%s. Training goes on; the next checkpoint tries again", message)

    def _injected(self, staged: Staged) -> None:
        """Test only (the spec's `debug` section): a slow or failing upload."""
        time.sleep(self.debug.checkpoint_delay_s)
        if staged.step in self.debug.fail_checkpoint_at_steps and self.store.rank == self.debug.fail_rank:
            raise OSError(errno.ENOSPC, f"debug.fail_checkpoint_at_steps: injected failure uploading step {staged.step}")

    # ---- a drain notice ---------------------------------------------------------------------
    def _drain(self, t: Training, end: StepEnd) -> None:
        """Checkpoint the step reached if the last checkpoint's duration fits before the deadline (or say why
        not), then wait for the scheduler to restart the workers. Collective: every rank got the same notice."""
        self.drain_seen = True
        notice, seen = end.notice, time.time()
        if t.rank == 0:
            log.warning("drain notice after step %d: %s", end.step, notice.describe(seen))
        if end.last or end.stop:
            return  # this step's checkpoint comes next, and waits; then the run ends
        self._wait(t)  # the publication in flight may be of this very step
        now, estimate = self.agreement.maximum(time.time(), self.last_seconds)
        left = None if notice.deadline is None else notice.deadline - now
        needed = DRAIN_SAFETY * estimate + DRAIN_MARGIN_S
        latest = tag_for(self.published_step) if self.published_step else "the start"
        fields = {"deadline": notice.deadline, "nodes": list(notice.nodes), "ranks": list(notice.ranks),
                  "notice_at": seen, "estimate_s": round(estimate, 3), "latest": self.published_step}
        if self.published_step == end.step:
            self.notes.event("drain_checkpoint", end.step, f"drain notice after step {end.step}: its checkpoint "
                             f"was published already", **fields)
        elif left is not None and needed > left:  # with no checkpoint to go by yet, 1 s at least
            took = f"the last checkpoint took {estimate:.1f} s" if estimate else "no checkpoint yet to go by"
            why = ("the deadline had passed when the notice reached the ranks" if left <= 0 else
                   f"{left:.1f} s to the deadline, {took} (needs ~{needed:.1f} s)")
            lost = (f"step {end.step}" if self.published_step == end.step - 1
                    else f"steps {(self.published_step or 0) + 1}-{end.step}")
            message = (f"drain notice after step {end.step}: no time for a checkpoint: {why}. The restart resumes "
                       f"from {latest}; {lost} will be trained again")
            log.error(message)
            self.notes.event("drain_no_time", end.step, message, seconds_left=round(left, 3), **fields)
        else:
            self._checkpoint(t, end.step, "drain", wait=True)
            if self.published_step == end.step:
                published = time.time()
                before = "" if notice.deadline is None else f", {notice.deadline - published:.1f} s before the deadline"
                message = (f"drain checkpoint of step {end.step} published {published - seen:.1f} s after the notice "
                           f"reached the ranks{before}")
                if t.rank == 0:
                    log.warning(message)
                self.notes.event("drain_checkpoint", end.step, message, published_at=published, **fields)
        self._hold(t, notice)

    def _hold(self, t: Training, notice: DrainNotice) -> None:
        """Wait for the scheduler to restart the workers, instead of training on.

        Why (Ray Train 2.60, controller.py `_handle_preempting_state`): once the controller has seen the notice
        it restarts the worker group when the deadline passes (plus FailureConfig.preemption_grace_s, 0 here),
        whether the node is gone by then or not, and the new group resumes from `latest`. Every step trained
        after the drain checkpoint would be thrown away and trained again: waiting loses none. Returning from
        the training function would end the run as finished ("a run that returns cleanly always finishes"),
        and raising would count as a failure (only workers killed with their node count as a preemption).
        Training on would only win when the remaining steps end the run before the deadline; not done (it
        needs a step-time estimate every rank agrees on). A scheduler that never restarts gets its ranks back
        at `notice.hold_until`: they train on."""
        push_rank_files(t.run, t.spec.output.home, t.rank)
        if notice.hold_until is None:
            return
        since = time.perf_counter()
        if t.rank == 0:
            log.warning("waiting for the scheduler to restart the workers on other nodes (until %s at the latest)",
                        time.strftime("%H:%M:%S", time.localtime(notice.hold_until)))
        for handler in logging.getLogger("zeroray").handlers:
            handler.flush()
        while (left := notice.hold_until - time.time()) > 0:
            time.sleep(min(left, 5.0))
        log.warning("no restart came by %s: training on", time.strftime("%H:%M:%S", time.localtime(notice.hold_until)))
        self.metrics.meter.exclude(time.perf_counter() - since)
