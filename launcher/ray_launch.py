"""`zeroray train`: run the trainer on every worker of a Ray cluster through Ray Train."""

from __future__ import annotations

import json
import os
import posixpath
import socket
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from cluster.local import ray_cluster, scaling_config, starts_embedded_cluster, worker_env
from launcher.driver_stop import DriverStop
from launcher.progress import Progress
from launcher.run_upload import RunDirUpload
from launcher.trackers import open_trackers
from trainer.checkpoint import CheckpointStore
from trainer.errors import RunPreempted, ZerorayError
from trainer.evaluation import held_out_batches
from trainer.preemption import DrainNotice
from trainer.run_prep import preflight_data, prepare_run_dir
from trainer.spec import RunSpec, parse_spec
from trainer.storage import RunDir, write_atomic


def _train_worker(config: dict) -> None:
    """Ray Train's per-worker entry point (module level, so it pickles by reference)."""
    import ray.train

    from trainer.loop import train

    spec = parse_spec(config["spec"], origin="spec sent by the driver")
    _record_placement(RunDir(spec.output.run_dir), ray.train.get_context())
    train(spec, on_checkpoint=_report_to_ray, notices=ray_drain_notice)


def _record_placement(run: RunDir, context) -> None:
    """One line per rank and attempt: where each rank ran (Ray node), for `cluster.placement` and for
    following restarts and resizes. One file per rank: appends from several nodes to one file on NFS
    can overwrite each other."""
    import ray

    line = {"time": time.time(), "rank": context.get_world_rank(), "world": context.get_world_size(),
            "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}
    run.logs.mkdir(parents=True, exist_ok=True)
    with open(run.logs / f"placement_rank_{line['rank']}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


POINTER_FILE = "zeroray_checkpoint.json"


def _report_to_ray(ckpt, record: dict) -> None:
    """Tell Ray Train about each published checkpoint, as a pointer.

    Why a pointer and not the checkpoint folder itself: Ray Train V2 refuses to start a run whose
    record names a checkpoint folder that no longer exists, and zeroray deletes folders on purpose
    (`output.keep_last`, skipping a damaged checkpoint). Ray keeps and prunes its own small pointer
    folders; `Result.checkpoint` points at one. Every rank reports: report is a barrier."""
    import ray.train
    from ray.train import Checkpoint

    metrics = {k: v for k, v in record.items() if isinstance(v, int | float)}
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, POINTER_FILE).write_text(json.dumps({"path": str(ckpt.path), "step": ckpt.step}))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=f"ray_{ckpt.tag}")


# Ray Train 2.60's controller waits this long for a drain without a deadline (DEFAULT_PREEMPTION_DEADLINE_S)
# before it restarts the workers; past the restart time the ranks stop waiting for it and train on.
RAY_DRAIN_WITHOUT_DEADLINE_S = 120.0
RESTART_SLACK_S = 30.0


def ray_drain_notice() -> DrainNotice | None:
    """The trainer's drain notices under Ray Train (trainer.preemption.NoticeSource): `get_preemption_info`,
    a barrier that gives every rank rank 0's answer; None until Ray's PreemptionWatcher sees a node hosting
    ranks of this run being drained. Ray restarts the worker group at the deadline (FailureConfig
    preemption_grace_s is 0), so the ranks wait for it until then and RESTART_SLACK_S more."""
    import ray.train

    info = ray.train.get_preemption_info()
    if info is None:
        return None
    deadline = info.deadline_ms / 1000 if info.deadline_ms else None
    restart = deadline if deadline is not None else time.time() + RAY_DRAIN_WITHOUT_DEADLINE_S
    return DrainNotice(deadline=deadline, nodes=tuple(info.preempted_node_ids), ranks=tuple(info.preempted_ranks),
                       hold_until=restart + RESTART_SLACK_S)


def failure_config(t):
    """Ray Train's FailureConfig from the trainer section. Of its preemption fields only the budget is ours
    to choose: the drain checkpoint needs every rank (each holds its own ZeRO shards) and so must land before
    the deadline, when the drained node goes; the survivors cannot commit one without it. Letting them run
    past the deadline (`preemption_grace_s`) or finish Ray's barriers without the drained ranks
    (`relax_collectives_on_preemption`) would only delay the restart, so both stay off."""
    from ray.train import FailureConfig

    return FailureConfig(max_failures=t.max_failures, max_preemption_failures=t.max_preemption_failures,
                         preemption_grace_s=0.0, relax_collectives_on_preemption=False)


def _pointed_checkpoint(result) -> str | None:
    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as folder:
        return json.loads(Path(folder, POINTER_FILE).read_text())["path"]


@dataclass(frozen=True)
class LaunchResult:
    run: RunDir
    status: str
    last: dict | None
    ray_checkpoint: str | None  # the last checkpoint as Ray Train recorded it (through its pointer)
    first_step_s: float | None
    wall_s: float


def launch(spec: RunSpec, fresh: bool = False, ray_temp_dir: str | None = None, progress_interval_s: float = 10.0,
           announce=print) -> LaunchResult:
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchConfig

    from launcher.ray_trainer import ZerorayTrainer

    started = time.time()
    # Ray Train's PreemptionWatcher polls the cluster's draining nodes every 5 s by default: a sixth of a 30 s
    # notice. Once a second costs one small GCS call per second (Ray Train passes the variable on to its
    # controller).
    os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")
    # Its controller polls the workers every 2 s by default: the end of a run, a failed rank or a finished
    # resize waits up to that long to be seen (docs/performance.md: with 0.5 s a 2-step demo command ends
    # 1.6 s sooner on average). A poll is one small call per worker; past 64 workers Ray's default stands.
    if spec.cluster.max_workers <= 64:
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    preflight_data(spec.sized_for(spec.cluster.max_workers))
    if spec.eval.sources:
        held_out_batches(spec, 0, spec.cluster.max_workers)  # a wrong eval path fails here, not in a worker
    run, status, latest = prepare_run_dir(spec, fresh)
    announce(status)
    if latest is not None and latest.step >= spec.trainer.max_steps:
        announce(f"the run already reached step {latest.step} (trainer.max_steps={spec.trainer.max_steps}); "
                 f"raise trainer.max_steps to continue it, or pass --fresh to start over")
        return LaunchResult(run, status, None, None, None, time.time() - started)
    c = spec.cluster
    remote = spec.output.remote
    trainer = ZerorayTrainer(
        _train_worker,
        train_loop_config={"spec": spec.to_dict()},
        torch_config=TorchConfig(backend="nccl" if c.gpus_per_worker else "gloo"),
        scaling_config=scaling_config(c),
        run_config=RunConfig(
            # Ray's run folder is zeroray's run directory: the checkpoints registered with Ray
            # must lie inside it, and there is one folder per run to find, move or delete.
            # A remote run directory reaches Ray through the same fsspec filesystem, wrapped for pyarrow.
            name=run.root.name,
            storage_path=str(run.root.parent) if remote is None else posixpath.dirname(remote.root),
            storage_filesystem=None if remote is None else PyFileSystem(FSSpecHandler(remote.fs)),
            failure_config=failure_config(spec.trainer),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.output.keep_last),
            # On a cluster of its own the raylet gives the workers their environment (cluster.local).
            worker_runtime_env=None if starts_embedded_cluster(c) else {"env_vars": worker_env(c)},
        ),
    )
    with RunDirUpload(run, remote) if remote is not None else nullcontext():
        return _fit(trainer, spec, run, status, latest, started, ray_temp_dir, progress_interval_s, announce)


def _fit(trainer, spec: RunSpec, run: RunDir, status: str, latest, started: float, ray_temp_dir: str | None,
         progress_interval_s: float, announce) -> LaunchResult:
    from ray.train import TrainingFailedError

    c = spec.cluster
    trackers = open_trackers(spec, run)
    write_status(run, "running", started)
    try:
        with ray_cluster(c, temp_dir=ray_temp_dir) as where:
            workers = f"{c.min_workers} to {c.max_workers}" if c.elastic else c.workers
            announce(f"training on {workers} worker(s) of the {where}; per-rank logs in {run.logs}")
            progress = Progress(run.metrics, latest.step if latest else 0, spec.trainer.max_steps,
                                progress_interval_s, sinks=(trackers,))
            with progress:
                try:
                    with DriverStop(run.root, spec.trainer.preemption_grace_s, announce) as stop:
                        ray_result = trainer.fit()
                except TrainingFailedError as exc:
                    message = explain_failure(exc, run, f"{spec.output.location}/checkpoints")
                    write_status(run, "failed", started, message)
                    raise ZerorayError(message) from None
    except KeyboardInterrupt:
        write_status(run, "interrupted", started)
        raise
    finally:
        trackers.close()
    stopped = stop.stopped_early(CheckpointStore.of_run(spec.output).latest(), spec.trainer.max_steps)
    if stopped:
        write_status(run, "preempted", started, stopped)
        raise RunPreempted(stopped)
    write_status(run, "finished", started)
    return LaunchResult(
        run=run,
        status=status,
        last=progress.last,
        ray_checkpoint=_pointed_checkpoint(ray_result),
        first_step_s=None if progress.first_record_at is None else progress.first_record_at - started,
        wall_s=time.time() - started,
    )


def write_status(run: RunDir, state: str, started: float, message: str | None = None) -> None:
    """What `zeroray runs` shows; written atomically so a reader never sees half a file. The `checkpoints`
    section is the trainer's (trainer.checkpoint_notes.CheckpointNotes: latest, in progress, drains, failures): kept."""
    status = {"status": state, "started": started, "updated": time.time(), "pid": os.getpid(),
              "host": socket.gethostname(), "message": message}
    try:
        checkpoints = json.loads(run.status.read_text()).get("checkpoints")
    except (OSError, ValueError, AttributeError):
        checkpoints = None
    if checkpoints:
        status["checkpoints"] = checkpoints
    write_atomic(run.status, json.dumps(status) + "\n")


def explain_failure(exc: Exception, run: RunDir, checkpoints: str) -> str:
    """One paragraph per failed rank instead of Ray's nested tracebacks."""
    failures = getattr(exc, "worker_failures", None) or {}
    lines = [f"training failed {_last_step(run)}; the last good checkpoint (if any) is in {checkpoints}."]
    info = getattr(exc, "preemption_info", None)
    if info is not None:  # Ray Train's PreemptionError: the drain budget is spent
        lines.append(f"  node(s) {', '.join(n[:12] for n in info.preempted_node_ids)} hosting rank(s) "
                     f"{', '.join(map(str, info.preempted_ranks))} were drained once more than "
                     f"trainer.max_preemption_failures allows; raise it (-1 = unlimited) and resume")
    for rank, err in sorted(failures.items()):
        root = err
        while getattr(root, "cause", None) is not None or root.__cause__ is not None:
            root = getattr(root, "cause", None) or root.__cause__
        message = [line for line in str(root).strip().splitlines() if line.strip()]
        summary = message[0][:400] if message else ""
        lines.append(f"  rank {rank}{_node_of(run, rank)}: {type(root).__name__}: {summary}")
        lines.append(f"  full log: {run.rank_log(rank)}")
    if not failures:
        lines.append(f"  {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
    return "\n".join(lines)


def _last_step(run: RunDir) -> str:
    """Where the run was: after its last metrics record (the failing step is one of those after it)."""
    try:
        lines = run.metrics.read_text().splitlines()
        return f"after step {json.loads(lines[-1])['step']}" if lines else "before its first step"
    except (OSError, ValueError, KeyError):
        return "before its first step"


def _node_of(run: RunDir, rank: int) -> str:
    """The host the rank last ran on (`_record_placement`), when it got that far."""
    try:
        last = (run.logs / f"placement_rank_{rank}.jsonl").read_text().splitlines()[-1]
        placed = json.loads(last)
        return f" on node {placed['host']} ({placed['node_id'][:12]})"
    except (OSError, ValueError, KeyError, IndexError):
        return ""
