"""Checks before anything starts, and the run directory's first files."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import yaml

from data_pipelines import BatchStream, DataConfig, LayoutError, SourceError
from trainer.checkpoint import Checkpoint, CheckpointStore
from trainer.errors import ZerorayError
from trainer.spec import RunSpec
from trainer.storage import RemoteStorageError, RunDir, pull_run_files


def preflight_data(spec: RunSpec) -> None:
    """Open the data and build one batch on the driver: a wrong path, an empty dataset or a
    missing text column fails here in a second, not inside a worker after the cluster started."""
    try:
        t = spec.trainer
        # In-process (loader_workers=0): one batch does not need a loader worker's start-up.
        data = spec.data.model_copy(update={"loader_workers": 0})
        stream = BatchStream(data, t.micro_batch_size, rank=0, world=spec.cluster.workers,
                             grad_accum=t.grad_accum_steps)
        next(stream)
    except (SourceError, LayoutError, FileNotFoundError) as exc:
        raise ZerorayError(str(exc)) from None
    except Exception as exc:  # pyarrow / datasets / fsspec errors on damaged or empty files
        where = ", ".join(s.path for s in spec.data.sources)
        raise ZerorayError(
            f"data: reading the first batch from {where} failed with {type(exc).__name__}: {exc}. "
            f"Is a file empty or damaged? Check the files, or rebuild them with `zeroray data prepare`."
        ) from None


def prepare_run_dir(spec: RunSpec, fresh: bool) -> tuple[RunDir, str, Checkpoint | None]:
    """Create (or reuse) the run directory. Returns it with a line saying what happened and the checkpoint
    the run resumes from (listing them costs a scan of the bucket on remote storage: done once, here).

    A relaunch reuses the folder and resumes; a relaunch with a different model or data is
    refused (it would mix two runs' checkpoints) unless there is nothing to lose yet.
    """
    run = RunDir(Path(spec.output.run_dir))
    home = spec.output.home
    try:
        home.check_writable()
    except RemoteStorageError as exc:
        raise ZerorayError(str(exc)) from None
    latest = CheckpointStore.of_run(spec.output).latest()
    if fresh and home.sizes():
        moved = home.rename(f"{run.root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.rmtree(run.root, ignore_errors=True)  # a working copy (a local run's folder was moved)
        status, latest = f"--fresh: moved the previous run to {moved}", None
    elif latest is not None:
        pull_run_files(run, home)  # the driver may be a new machine: the saved spec and progress
        _refuse_other_run(run, spec)
        status = f"resuming {spec.output.location} from {latest.tag}"
    else:
        status = f"new run in {spec.output.location}"
    run.root.mkdir(parents=True, exist_ok=True)
    run.spec.write_text(spec.to_yaml())
    home.put(run.spec, "spec.yaml")
    return run, status, latest


# data keys that change how fast or how strictly the data is read, not which data or in what order.
_DATA_KEYS_NOT_DEFINING_THE_RUN = ("loader_workers", "tokenize_batch", "bad_data")


def order_defining(section: str, values: dict | None) -> dict | None:
    """The part of a saved spec section that makes a run what it is. In `data`: without the keys
    above, and without keys at their default value (a key a newer zeroray added with its default
    does not make an older run folder another run)."""
    if section != "data" or values is None:
        return values
    defaults = DataConfig(sources=[{"path": "-"}]).model_dump(mode="json")
    return {k: v for k, v in values.items()
            if k not in _DATA_KEYS_NOT_DEFINING_THE_RUN and not (k != "sources" and defaults.get(k) == v)}


def _refuse_other_run(run: RunDir, spec: RunSpec) -> None:
    if not run.spec.is_file():
        return
    saved = yaml.safe_load(run.spec.read_text()) or {}
    new = spec.to_dict()
    changed = [k for k in ("model", "data") if order_defining(k, saved.get(k)) != order_defining(k, new[k])]
    if changed:
        raise ZerorayError(
            f"{run.root} holds checkpoints of a run with a different {' and '.join(changed)} section. "
            f"Resuming would mix two runs. Use --fresh to start over (the old run is moved aside), "
            f"or choose another output.name."
        )
