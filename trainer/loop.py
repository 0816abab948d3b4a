"""The training loop every worker runs: build → resume → step, with hooks after every step.

It knows nothing about Ray: under Ray Train the process group already exists when it starts;
under torchrun or `accelerate launch`, DeepSpeed creates it from the environment. What a researcher
edits is `run_steps`; what happens around the steps (metrics, evaluation, checkpoints, stopping) is
in trainer/hooks.py, building in trainer/build.py, resuming in trainer/resume.py.
"""

from __future__ import annotations

import logging
import time

import torch.distributed as dist

from trainer import resume
from trainer.build import Training, build_training, init_distributed, seed_everything, setup_logging
from trainer.checkpoint import CheckpointStore
from trainer.hooks import CheckpointCallback, StepEnd, StepHook, default_hooks
from trainer.preemption import NoticeSource, StopAgreement
from trainer.spec import RunSpec
from trainer.storage import RunDir, push_rank_files

log = logging.getLogger("zeroray.trainer")


def train(spec: RunSpec, on_checkpoint: CheckpointCallback | None = None,
          notices: NoticeSource | None = None) -> dict | None:
    """Run the whole job in this process; returns the last metrics record on rank 0.

    `on_checkpoint` lets a launcher tell its scheduler about each checkpoint (Ray Train's report), and
    `notices` lets it say that nodes hosting ranks are being drained (Ray Train's preemption notice),
    without the loop knowing about that scheduler (trainer.preemption.NoticeSource)."""
    started = time.time()
    rank, world = init_distributed(spec)
    spec = spec.sized_for(world)  # cluster.workers [min, max]: the count Ray Train started, its accumulation
    run = RunDir(spec.output.run_dir)
    setup_logging(run, rank)
    try:
        return _train(spec, run, rank, world, started, on_checkpoint, notices)
    except Exception:
        log.exception("training failed on rank %d", rank)
        push_rank_files(run, spec.output.home, rank)  # the log says why; its node may be gone next
        raise


def _train(spec: RunSpec, run: RunDir, rank: int, world: int, started: float,
           on_checkpoint: CheckpointCallback | None, notices: NoticeSource | None = None) -> dict | None:
    stop = StopAgreement(run.root, rank)
    stop.watch_signals()  # torchrun & co.; under Ray the driver forwards SIGTERM through the run directory
    store = CheckpointStore.of_run(spec.output, rank, world)
    checkpoint = resume.choose_checkpoint(store, spec, world)
    t = build_training(spec, run, rank, world,
                       resume.universal_config(store, checkpoint, world, spec.trainer.zero_stage))
    if checkpoint is not None:
        resume.load(t, store, checkpoint)
    else:
        seed_everything(spec.trainer.seed + 1000 * (rank + 1))  # per-rank streams for dropout-like draws
    hooks = default_hooks(t, started, stop, store, on_checkpoint, notices)
    try:
        record = run_steps(t, hooks)
        if t.stopped:
            log.warning("stopped after the checkpoint of step %d: %s", t.step,
                        stop.local_reason() or "another rank was asked to")
            stop.served()
    finally:
        stop.restore_signals()
    dist.barrier()
    return record if rank == 0 else None


def run_steps(t: Training, hooks: list[StepHook]) -> dict | None:
    """Optimizer steps until trainer.max_steps, or until the hooks agree to stop; returns the last
    metrics record."""
    accum, max_steps, record = t.spec.trainer.grad_accum_steps, t.spec.trainer.max_steps, None
    while t.step < max_steps:
        for _ in range(accum):
            batch = {k: v.to(t.device, non_blocking=True) for k, v in next(t.data).items()}
            out = t.engine(**batch)
            t.engine.backward(out.loss)
            t.engine.step()
            for hook in hooks:
                hook.micro_step(out)
        t.engine.module.after_optimizer_step()  # e.g. MoE expert-bias updates from the step's load
        t.step += 1
        end = StepEnd(t.step, last=t.step == max_steps)
        for hook in hooks:
            hook.step_end(t, end)
        record = end.record or record
        if end.stop:
            t.stopped = True
            break
    return record
