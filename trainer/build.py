"""Everything a worker builds before its first step: the process group, logging, the seeded model, the
DeepSpeed engine and the data stream. Nothing here knows about Ray: under Ray Train the process group
already exists; under torchrun or `accelerate launch`, DeepSpeed creates it from the environment."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

import models
from data_pipelines import BatchStream
from trainer.ds_config import deepspeed_config, resolve_precision
from trainer.spec import RunSpec
from trainer.storage import RunDir

log = logging.getLogger("zeroray.trainer")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logging(run: RunDir, rank: int) -> None:
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


def skip_inference_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce op (deepspeed_shm_comm) at every
    init_distributed of a machine that has not built it yet: about 60 s of both cores here, paid by the first
    run of every clean clone, CI run and new user's demo. The op serves only `inference_all_reduce` (DeepSpeed's
    AutoTP inference layers); training's collectives go through torch.distributed (gloo). Marking it
    incompatible takes DeepSpeed's own path for a machine that cannot build it (comm/torch.py build_shm_op).
    The probed dict is cached in deepspeed.ops on first access, so the edit holds for this process."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(spec: RunSpec) -> tuple[int, int]:
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        skip_inference_comm_op()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    else:
        deepspeed.init_distributed()  # adopts the group Ray Train created
    if accel.device_name() == "cpu":
        torch.set_num_threads(spec.cluster.cpus_per_worker)
    else:
        accel.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


@dataclass
class Training:
    """What the step loop and its hooks share; `step` is the number of optimizer steps taken."""

    spec: RunSpec
    run: RunDir
    rank: int
    world: int
    engine: deepspeed.DeepSpeedEngine
    scheduler: object
    data: BatchStream
    precision: str
    flops_per_token: float
    step: int = 0
    stopped: bool = False  # stopped on request before trainer.max_steps

    @property
    def device(self) -> torch.device:
        return self.engine.device


def build_model(spec: RunSpec, rank: int) -> tuple[torch.nn.Module, float]:
    """The model with identical initial weights on every rank (experts split when asked), and its
    training FLOPs per token (of the whole model: counted before experts or ZeRO-3 split it)."""
    t = spec.trainer
    seed_everything(t.seed)
    model = models.build(spec.model)
    flops_per_token = spec.flops_per_token(model)
    if t.activation_checkpointing:
        model.enable_activation_checkpointing()
    if t.expert_parallel > 1:
        # Split the experts of the model just built (same seed: same weights as without), before
        # DeepSpeed sees the model. Rank r holds slice r % ep, DeepSpeed's default group layout.
        # Imported here: it needs DeepSpeed's AutoEP module (the pinned 0.19.8), runs without EP do not.
        from models.layers.expert_parallel import shard_experts

        layers = shard_experts(model, t.expert_parallel, rank % t.expert_parallel)
        log.info("expert parallelism: %d MoE layer(s) split over %d ranks", layers, t.expert_parallel)
    return model, flops_per_token


def build_training(spec: RunSpec, run: RunDir, rank: int, world: int, checkpoint_config: dict | None) -> Training:
    """Model, engine and data stream, before any checkpoint is loaded. `checkpoint_config` is DeepSpeed's
    `checkpoint` section (a universal checkpoint to load on another worker count)."""
    t = spec.trainer
    model, flops_per_token = build_model(spec, rank)
    precision = resolve_precision(spec)
    ds_config = deepspeed_config(spec, precision)
    if checkpoint_config:
        ds_config["checkpoint"] = checkpoint_config
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.param_groups(t.weight_decay), config=ds_config)
    if t.expert_parallel > 1:
        from models.layers.expert_parallel import check_engine

        check_engine(engine, t.expert_parallel)
    if t.compile:
        engine.compile()  # in place: parameter names, and so checkpoints, stay those of the plain model
        log.info("model compiled with torch.compile (backend %s)", get_accelerator().get_compile_backend())
    data = BatchStream(spec.data, t.micro_batch_size, rank, world, grad_accum=t.grad_accum_steps)
    return Training(spec, run, rank, world, engine, scheduler, data, precision, flops_per_token)
