"""`zeroray train`: run the trainer on every worker of a Ray cluster through Ray Train."""

from __future__ import annotations

import time
from dataclasses import dataclass

from cluster.local import ray_cluster, worker_env
from launcher.errors import ZerorayError
from launcher.progress import Progress
from launcher.run_prep import preflight_data, prepare_run_dir
from launcher.spec import RunSpec, parse_spec
from trainer.checkpoint import CheckpointStore
from trainer.run_dir import RunDir


def _train_worker(config: dict) -> None:
    """Ray Train's per-worker entry point (module level, so it pickles by reference)."""
    from trainer.loop import train

    train(parse_spec(config["spec"], origin="spec sent by the driver"))


@dataclass(frozen=True)
class LaunchResult:
    run: RunDir
    status: str
    last: dict | None
    first_step_s: float | None
    wall_s: float


def launch(spec: RunSpec, fresh: bool = False, ray_temp_dir: str | None = None, progress_interval_s: float = 10.0,
           announce=print) -> LaunchResult:
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.time()
    preflight_data(spec)
    run, status = prepare_run_dir(spec, fresh)
    announce(status)
    latest = CheckpointStore(run.checkpoints, 0, 1).latest()
    if latest is not None and latest.step >= spec.trainer.max_steps:
        announce(f"the run already reached step {latest.step} (trainer.max_steps={spec.trainer.max_steps}); "
                 f"raise trainer.max_steps to continue it, or pass --fresh to start over")
        return LaunchResult(run, status, None, None, time.time() - started)
    c = spec.cluster
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"spec": spec.to_dict()},
        torch_config=TorchConfig(backend="nccl" if c.gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=c.workers,
            use_gpu=bool(c.gpus_per_worker),
            resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {})},
        ),
        run_config=RunConfig(
            name="ray",
            storage_path=str(run.root),
            failure_config=FailureConfig(max_failures=spec.trainer.max_failures),
            worker_runtime_env={"env_vars": worker_env(c)},
        ),
    )
    with ray_cluster(c, temp_dir=ray_temp_dir) as where:
        announce(f"training on {c.workers} worker(s) of the {where}; per-rank logs in {run.logs}")
        progress = Progress(run.metrics, latest.step if latest else 0, spec.trainer.max_steps, progress_interval_s)
        with progress:
            try:
                trainer.fit()
            except TrainingFailedError as exc:
                raise ZerorayError(explain_failure(exc, run)) from None
    return LaunchResult(
        run=run,
        status=status,
        last=progress.last,
        first_step_s=None if progress.first_record_at is None else progress.first_record_at - started,
        wall_s=time.time() - started,
    )


def explain_failure(exc: Exception, run: RunDir) -> str:
    """One paragraph per failed rank instead of Ray's nested tracebacks."""
    failures = getattr(exc, "worker_failures", None) or {}
    lines = [f"training failed; the last good checkpoint (if any) is in {run.checkpoints}."]
    for rank, err in sorted(failures.items()):
        root = err
        while getattr(root, "cause", None) is not None or root.__cause__ is not None:
            root = getattr(root, "cause", None) or root.__cause__
        message = str(root).strip().splitlines()
        lines.append(f"  rank {rank}: {type(root).__name__}: {message[-1] if message else ''}")
        lines.append(f"  full log: {run.rank_log(rank)}")
    if not failures:
        lines.append(f"  {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
    return "\n".join(lines)
