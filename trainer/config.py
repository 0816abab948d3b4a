"""The `trainer` section of the run spec (optimisation, precision, ZeRO, checkpoints, failures) and the
test-only `debug` section."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 (plain data parallel) to 3.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 where the hardware supports it, else fp32."
    )
    micro_batch_size: int = Field(8, ge=1, description="Sequences per rank per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Rows per optimizer step. With a fixed cluster.workers an optional check (must equal "
        "micro_batch_size × grad_accum_steps × workers); required with a range of workers, where the trainer "
        "derives grad_accum_steps from it on whatever worker count it gets.",
    )
    expert_parallel: int = Field(
        1, ge=1, description="Ranks that split each MoE layer's experts; 1 = every rank holds all experts."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)."
    )
    compile: bool = Field(
        False,
        description="torch.compile the model through DeepSpeed (`engine.compile()`): on GPUs it fuses the small "
        "kernels of norms, rotary embeddings and activations (see docs/performance.md); the first steps "
        "wait for compilation (tens of seconds to minutes).",
    )
    max_steps: int = Field(300, ge=1, description="Optimizer steps to train for.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 = off.")
    seed: int = Field(0, description="Seed of model initialisation and every random draw.")
    log_every: int = Field(10, ge=1, description="Steps between metric records.")
    peak_flops_per_worker: float | None = Field(
        None, gt=0, description="Peak FLOP/s of one worker in the training precision, MFU's denominator; default: "
        "NVIDIA's dense figure for known GPUs (trainer/metrics.py), measured with a short matmul loop on CPU."
    )
    checkpoint_every: int = Field(100, ge=0, description="Steps between checkpoints; 0 = only at the end.")
    max_failures: int = Field(
        0, ge=0, description="Restarts from the latest checkpoint Ray Train may attempt after a worker dies or fails "
        "(node preemptions that Ray sees coming are not counted: docs/fault_tolerance.md)."
    )
    preemption_grace_s: float = Field(
        25.0, gt=0, description="After SIGTERM, seconds the driver waits for the workers to checkpoint at the next "
        "step boundary and stop; then it exits without that checkpoint. Keep it below the platform's notice "
        "(Kubernetes terminationGracePeriodSeconds 30 s by default, GCP Spot 30 s, AWS Spot 120 s). Not Ray Train's "
        "FailureConfig.preemption_grace_s, which zeroray keeps at 0 (docs/fault_tolerance.md)."
    )
    max_preemption_failures: int = Field(
        -1, ge=-1, description="Restarts Ray Train may attempt after nodes hosting ranks are drained (a spot "
        "reclaim or scale-down that Ray announces: `ray drain-node`, the autoscaler, KubeRay), counted apart from "
        "trainer.max_failures; -1 = unlimited (Ray's default), 0 = the first drain ends the run. The ranks "
        "checkpoint on the notice first (trainer.drain_checkpoint)."
    )
    drain_checkpoint: bool = Field(
        True, description="When Ray Train reports that a node hosting ranks is draining, checkpoint at the next "
        "step boundary if the last checkpoint's duration fits before the deadline, then wait for Ray Train to "
        "restart the workers elsewhere: no step is lost. false: ignore the notice (the restart resumes from the "
        "last periodic checkpoint)."
    )
    async_checkpoint: bool = Field(
        True, description="Publish checkpoints in the background: the step loop waits only while DeepSpeed writes "
        "the state to local staging; checksums, the upload to output.dir, the manifest, `latest` and retention "
        "run in a thread while training goes on (one checkpoint in flight at most; the last step, a stop and a "
        "drain wait for theirs). false: every rank waits until each checkpoint is published."
    )

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainerConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be smaller than max_steps ({self.max_steps})"
            )
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {self.betas} must each lie in [0, 1)")
        return self



def _common_multiple(counts: range, limit: int = 2**40) -> int | None:
    """The least common multiple of the worker counts, or None once it passes `limit` (rows per step no
    run would use: the range [1, 40] already needs 5·10^15)."""
    multiple = 1
    for count in counts:
        multiple = math.lcm(multiple, count)
        if multiple > limit:
            return None
    return multiple


def check_elastic_batch(t: TrainerConfig, workers: tuple[int, int], check_layout: Callable[[int, int], None]) -> None:
    """A range of workers: Ray Train may run any count in it, so every count must keep the optimizer step
    at trainer.global_batch_size rows with a whole gradient accumulation, and read whole data streams
    (`check_layout(global_batch, workers)`, the data section's own rule)."""
    low, high = workers
    counts = range(low, high + 1)
    where = f"cluster.workers [{low}, {high}] is a range (Ray Train may run any count in it)"
    fits = _common_multiple(counts)
    rows = None if fits is None else t.micro_batch_size * fits
    too_wide = "no global batch of practical size suits every count: narrow the range"
    if t.global_batch_size is None:
        raise ValueError(f"{where}: set trainer.global_batch_size, the rows per optimizer step it keeps on every "
                         f"count ({too_wide if rows is None else f'a multiple of {rows}'})")
    if t.grad_accum_steps != 1:
        raise ValueError(f"{where}: trainer.grad_accum_steps is derived from trainer.global_batch_size on each "
                         f"count; remove trainer.grad_accum_steps={t.grad_accum_steps}")
    if t.expert_parallel > 1:
        raise ValueError(f"{where}: not supported with trainer.expert_parallel > 1 yet (experts are stored per "
                         f"expert-parallel rank); use a fixed cluster.workers")
    uneven = [w for w in counts if t.global_batch_size % (t.micro_batch_size * w)]
    if uneven:
        shown = ", ".join(map(str, uneven[:8])) + (f" and {len(uneven) - 8} more" if len(uneven) > 8 else "")
        raise ValueError(
            f"{where}: trainer.global_batch_size ({t.global_batch_size}) is not a multiple of "
            f"trainer.micro_batch_size ({t.micro_batch_size}) × workers for {shown} worker(s). "
            + (too_wide.capitalize() if rows is None else f"Use a multiple of {rows}, or another range or micro-batch")
        )
    for w in counts:
        try:
            check_layout(t.global_batch_size, w)
        except ValueError as exc:
            raise ValueError(f"{where}; on {w} worker(s): {exc}") from None


class DebugConfig(BaseModel):
    """Failure injection for zeroray's own tests: never set in a real run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fail_at_steps: tuple[int, ...] = Field(
        (), description="Test only: optimizer steps right after which rank fail_rank fails (before that step's "
        "checkpoint), once each: a marker file in the run directory stops the restarted run from failing again."
    )
    fail_rank: int = Field(0, ge=0, description="Test only: the rank that fails.")
    fail_mode: Literal["kill", "raise"] = Field(
        "kill", description="Test only: kill = SIGKILL to the rank's own process (a lost machine); raise = an "
        "exception in the training loop (a bug)."
    )
    step_delay_s: float = Field(
        0.0, ge=0, description="Test only: sleep after every optimizer step, so a tiny run lasts long enough for "
        "cluster changes to happen during it."
    )
    checkpoint_delay_s: float = Field(
        0.0, ge=0, description="Test only: every checkpoint's publication waits this long before its manifest is "
        "written (a slow upload), so that training, drains and failures can happen while it is in flight."
    )
    fail_checkpoint_at_steps: tuple[int, ...] = Field(
        (), description="Test only: the publication of these steps' checkpoints fails on rank fail_rank with an "
        "injected storage error (no space left on device), before its manifest."
    )

    @property
    def active(self) -> bool:
        """Whether the section asks for anything (only then is failure injection part of the loop)."""
        return bool(self.fail_at_steps or self.step_delay_s)

    @model_validator(mode="after")
    def _steps_positive(self) -> DebugConfig:
        if any(s < 1 for s in self.fail_at_steps):
            raise ValueError(f"debug.fail_at_steps {list(self.fail_at_steps)}: steps count from 1")
        if any(s < 1 for s in self.fail_checkpoint_at_steps):
            raise ValueError(f"debug.fail_checkpoint_at_steps {list(self.fail_checkpoint_at_steps)}: steps count from 1")
        return self
