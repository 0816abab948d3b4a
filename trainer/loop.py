"""The training loop every worker runs: build → resume → step → log → checkpoint.

It knows nothing about Ray: under Ray Train the process group already exists when it starts;
under torchrun or `accelerate launch`, DeepSpeed creates it from the environment.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

import models
from data_pipelines import BatchStream, merge_states
from trainer.checkpoint import Checkpoint, CheckpointError, CheckpointStore, rng_state, set_rng_state
from trainer.ds_config import deepspeed_config, resolve_precision
from trainer.evaluation import Evaluator
from trainer.metrics import StepMetrics
from trainer.preemption import StopAgreement, after_step
from trainer.run_dir import RunDir
from trainer.run_upload import push_rank_files
from trainer.spec import RunSpec, read_spec

log = logging.getLogger("zeroray.trainer")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup_logging(run: RunDir, rank: int) -> None:
    run.logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run.rank_log(rank))
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s"))
    for name in ("zeroray", "DeepSpeed"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    # DeepSpeed's console chatter would drown the progress bar; its log still reaches the file.
    logging.getLogger("DeepSpeed").propagate = False
    for h in list(logging.getLogger("DeepSpeed").handlers):
        if not isinstance(h, logging.FileHandler):
            logging.getLogger("DeepSpeed").removeHandler(h)


def _init_distributed(spec: RunSpec) -> tuple[int, int]:
    accel = get_accelerator()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    else:
        deepspeed.init_distributed()  # adopts the group Ray Train created
    if accel.device_name() == "cpu":
        torch.set_num_threads(spec.cluster.cpus_per_worker)
    else:
        accel.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


CheckpointHook = Callable[[Checkpoint, dict], None]
"""Called on every rank after a checkpoint is published, with the latest metrics record."""


def train(spec: RunSpec, on_checkpoint: CheckpointHook | None = None) -> dict | None:
    """Run the whole job in this process; returns the last metrics record on rank 0.

    `on_checkpoint` lets a launcher tell its scheduler about each checkpoint (Ray Train's report)
    without the loop knowing about that scheduler."""
    started = time.time()
    rank, world = _init_distributed(spec)
    spec = spec.sized_for(world)  # cluster.workers [min, max]: the count Ray Train started, its accumulation
    run = RunDir(spec.output.run_dir)
    _setup_logging(run, rank)
    try:
        return _train(spec, run, rank, world, started, on_checkpoint)
    except Exception:
        log.exception("training failed on rank %d", rank)
        push_rank_files(run, spec.output.remote, rank)  # the log says why; its node may be gone next
        raise


def _check_resumable(ckpt: Checkpoint, spec: RunSpec, world: int) -> None:
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


def _train(spec: RunSpec, run: RunDir, rank: int, world: int, started: float,
           on_checkpoint: CheckpointHook | None) -> dict | None:
    t = spec.trainer
    stop = StopAgreement(run.root, rank)
    stop.watch_signals()  # torchrun & co.; under Ray the driver forwards SIGTERM through the run directory
    store = CheckpointStore.of_run(spec.output, rank, world)
    store.remove_staging()
    dist.barrier()
    resume = store.verified_latest()  # checksums: a damaged checkpoint falls back to the one before
    if resume is not None:
        _check_resumable(resume, spec, world)
    resized = resume is not None and resume.world_size != world

    seed_everything(t.seed)  # identical initial weights on every rank
    model = models.build(spec.model)
    flops_per_token = spec.flops_per_token(model)  # of the whole model: before experts or ZeRO-3 split it
    if t.activation_checkpointing:
        model.enable_activation_checkpointing()
    if t.expert_parallel > 1:
        # Split the experts of the model just built (same seed: same weights as without), before
        # DeepSpeed sees the model. Rank r holds slice r % ep, DeepSpeed's default group layout.
        # Imported here: it needs DeepSpeed's AutoEP module (the pinned 0.19.8), runs without EP do not.
        from models.layers.expert_parallel import check_engine, shard_experts

        layers = shard_experts(model, t.expert_parallel, rank % t.expert_parallel)
        log.info("expert parallelism: %d MoE layer(s) split over %d ranks", layers, t.expert_parallel)
    precision = resolve_precision(spec)
    ds_config = deepspeed_config(spec, precision)
    load_root, load_tag = store.root, resume.tag if resume else None
    if resized and t.zero_stage > 0:
        # ZeRO partitions the optimizer state per rank: DeepSpeed's universal checkpoint holds it whole,
        # and loads on any number of ranks (ZeRO-0 keeps it whole already).
        universal = store.universal(resume)
        ds_config["checkpoint"] = {"load_universal": True}
        load_root, load_tag = universal.parent, universal.name
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=model.param_groups(t.weight_decay),
        config=ds_config,
    )
    if t.expert_parallel > 1:
        check_engine(engine, t.expert_parallel)
    if t.compile:
        engine.compile()  # in place: parameter names, and so checkpoints, stay those of the plain model
        log.info("model compiled with torch.compile (backend %s)", get_accelerator().get_compile_backend())
    data = BatchStream(spec.data, t.micro_batch_size, rank, world, grad_accum=t.grad_accum_steps)
    step = 0
    if resume is not None:
        load_path, _ = engine.load_checkpoint(str(load_root), tag=load_tag)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {resume.path}")
        step = resume.step
        if resized:
            # Every logical data stream continues where it stopped, whichever rank now reads it.
            data.load_state_dict(merge_states(store.rank_state(resume, r)["data"] for r in range(resume.world_size)))
            # Per-rank RNG streams cannot carry over to another rank count: new ones, keyed by the step.
            seed_everything(t.seed + 1000 * (rank + 1) + step)
            dist.barrier()
            store.remove_universal()
            log.info("resumed from %s (written by %d workers) at step %d on %d workers",
                     resume.path, resume.world_size, step, world)
        else:
            state = store.rank_state(resume)
            data.load_state_dict(state["data"])
            set_rng_state(state["rng"])
            log.info("resumed from %s at step %d", resume.path, step)
    else:
        seed_everything(t.seed + 1000 * (rank + 1))  # per-rank streams for dropout-like draws

    device = engine.device
    evaluator = Evaluator(spec, rank, world, device) if spec.eval.sources else None
    meter = StepMetrics(spec, flops_per_token, precision, rank, world, device, started)
    record: dict | None = None
    while step < t.max_steps:
        for _ in range(t.grad_accum_steps):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(data).items()}
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            meter.add(out)
        step += 1
        meter.step_done()
        last = step == t.max_steps
        evaluate = evaluator is not None and evaluator.due(step, last)
        if meter.due(step) or evaluate:
            record = meter.record(step, engine, scheduler, data, evaluator if evaluate else None)
            if rank == 0:
                with open(run.metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")
        after_step(spec.debug, step, rank, run.root)  # test-only failure injection
        stopping = stop.agreed()  # preemption: checkpoint now, then stop
        if last or stopping or (t.checkpoint_every and step % t.checkpoint_every == 0):
            saving_since = time.perf_counter()
            published = store.save(
                engine,
                step,
                rank_state={"data": data.state_dict(), "rng": rng_state()},
                run_files={"spec.yaml": spec.to_yaml(), "trainer_state.json": json.dumps({"step": step})},
                keep_last=spec.output.keep_last,
            )
            push_rank_files(run, spec.output.remote, rank)
            if on_checkpoint is not None:
                on_checkpoint(published, record or {"step": step})
            meter.exclude(time.perf_counter() - saving_since)
            if rank == 0:
                log.info("checkpoint at step %d", step)
        if stopping:
            log.warning("stopped after the checkpoint of step %d: %s", step,
                        stop.local_reason() or "another rank was asked to")
            stop.served()
            break
    stop.restore_signals()
    dist.barrier()
    return record if rank == 0 else None
