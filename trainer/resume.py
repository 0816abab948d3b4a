"""Resuming: which checkpoint, whether it fits this run, and loading it into a built `Training` — on the
same worker count exactly (every rank's data position and RNG), on another one through DeepSpeed's
universal checkpoint (each logical data stream continues wherever it is now read)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipelines import merge_states
from trainer.build import Training, seed_everything
from trainer.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from trainer.rng import set_rng_state
from trainer.safe_load import UnsafeCheckpointError, load_file, weights_only_loads
from trainer.spec import RunSpec, read_spec

log = logging.getLogger("zeroray.trainer")


def check_resumable(ckpt: Checkpoint, spec: RunSpec, world: int) -> None:
    """A checkpoint resumes on another worker count when the optimizer step stays the same: the
    same global batch (gradient accumulation makes up the difference) and the same expert split."""
    saved = read_spec(ckpt.path / "spec.yaml")
    t = spec.trainer
    if saved.trainer.expert_parallel != t.expert_parallel:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written with trainer.expert_parallel={saved.trainer.expert_parallel} but "
            f"this run has {t.expert_parallel}: experts and their optimizer state are stored per expert-parallel "
            f"rank. Set trainer.expert_parallel={saved.trainer.expert_parallel}, or start over with --fresh."
        )
    if ckpt.world_size == world:
        return
    if saved.global_batch_size != spec.global_batch_size:
        accum, rest = divmod(saved.global_batch_size, t.micro_batch_size * world)
        hint = f"trainer.grad_accum_steps={accum}" if accum and not rest else "a micro-batch and accumulation"
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written by {ckpt.world_size} workers with a global batch of "
            f"{saved.global_batch_size} rows; this run has {world} workers and {spec.global_batch_size}. To resume "
            f"on {world} workers keep the global batch: set {hint} (micro-batch × accumulation × workers = "
            f"{saved.global_batch_size}), or start over with --fresh."
        )
    if t.expert_parallel > 1:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was written by {ckpt.world_size} workers with expert parallelism; resuming "
            f"it on {world} workers is not supported yet. Set cluster.workers={ckpt.world_size}."
        )


def choose_checkpoint(store: CheckpointStore, spec: RunSpec, world: int) -> Checkpoint | None:
    """The checkpoint to resume from (checksums verified: a damaged one falls back to the one before),
    after clearing what a crash left half-written. Collective."""
    store.remove_staging()
    dist.barrier()
    resume = store.verified_latest()
    if resume is not None:
        check_resumable(resume, spec, world)
    return resume


def universal_config(store: CheckpointStore, resume: Checkpoint | None, world: int, zero_stage: int) -> dict | None:
    """DeepSpeed's `checkpoint` section for a resume on another worker count: ZeRO partitions the optimizer
    state per rank, and the universal checkpoint holds it whole (ZeRO-0 keeps it whole already)."""
    if resume is None or resume.world_size == world or zero_stage == 0:
        return None
    return {"load_universal": True}


def load(training: Training, store: CheckpointStore, resume: Checkpoint) -> None:
    """Load `resume` into the engine, the data stream and the RNGs; `training.step` continues from it."""
    t, world, rank = training.spec.trainer, training.world, training.rank
    resized = resume.world_size != world
    root, tag = store.root, resume.tag
    if resized and t.zero_stage > 0:
        universal = store.universal(resume)
        root, tag = universal.parent, universal.name
    try:
        with weights_only_loads():  # DeepSpeed's own loads too: nothing in the checkpoint runs code
            load_path, _ = training.engine.load_checkpoint(str(root), tag=tag)
    except UnsafeCheckpointError as exc:
        raise CheckpointError(str(exc)) from None
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {resume.path}")
    training.step = resume.step
    if resized and t.zero_stage > 0:
        restore_buffers(training.engine.module, store.root / resume.tag)  # the working copy, as fetched
    if resized:
        # Every logical data stream continues where it stopped, whichever rank now reads it.
        states = (store.rank_state(resume, r)["data"] for r in range(resume.world_size))
        training.data.load_state_dict(merge_states(states))
        # Per-rank RNG streams cannot carry over to another rank count: new ones, keyed by the step.
        seed_everything(t.seed + 1000 * (rank + 1) + resume.step)
        dist.barrier()
        store.remove_universal()
        log.info("resumed from %s (written by %d workers) at step %d on %d workers",
                 resume.path, resume.world_size, resume.step, world)
    else:
        state = store.rank_state(resume)
        training.data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", resume.path, resume.step)


def restore_buffers(module: torch.nn.Module, checkpoint_dir: Path) -> None:
    """The module's persistent buffers (e.g. MoE expert biases) from the checkpoint's own model states.
    Why: DeepSpeed 0.19.8's universal-checkpoint load restores parameters and optimizer state only, so a
    resume on another worker count would otherwise start every buffer from its initial value. Buffers are
    not partitioned by ZeRO: rank 0's file holds them whole."""
    states = load_file(checkpoint_dir / "mp_rank_00_model_states.pt")["module"]
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in states:
                buffer.copy_(states[name].to(buffer.device, buffer.dtype))
