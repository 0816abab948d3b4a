"""Metric trackers fed on the driver from the run's metrics records (the JSONL file stays the
source of truth; trackers are views of it, so a tracker failing never stops training).

`output.trackers` picks them: TensorBoard (tensorboardX event files), Weights & Biases (an offline
run in the run directory, uploaded later with `wandb sync`) and MLflow (a local file store in the
run directory unless `output.mlflow_uri` names another). W&B and MLflow are imported only when
configured. A relaunch of the same run directory continues the same W&B / MLflow run: their ids
are kept in `trackers.json` there.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path

from trainer.errors import ZerorayError
from trainer.spec import RunSpec
from trainer.storage import RunDir

log = logging.getLogger("zeroray.trackers")

IDS_FILE = "trackers.json"
_NOT_METRICS = ("step", "max_steps", "time")


def scalars(record: dict) -> dict[str, float]:
    """A record's numbers under their metric names; a list (tokens per expert, memory per rank)
    becomes one number per item, `name/i`. Text (precision) and missing values are left out."""
    out: dict[str, float] = {}
    for name, value in record.items():
        if name in _NOT_METRICS or isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            out[name] = value
        elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
            out.update({f"{name}/{i}": v for i, v in enumerate(value)})
    return out


def samples_text(record: dict) -> str | None:
    """The record's continuations of eval.sample_prompts as Markdown (the prompt in bold), or None."""
    samples = record.get("eval/samples")
    if not samples:
        return None
    return "\n\n".join(f"**{s['prompt']}**{s['text']}" for s in samples)


def spec_params(spec: RunSpec) -> dict[str, str | int | float | bool | None]:
    """The spec flattened to dotted keys (`trainer.lr`), for trackers' parameter tables. Storage
    options are left out: they may hold credentials, and trackers upload what they get."""

    def walk(node, prefix: str) -> dict:
        if isinstance(node, dict):
            items = {k: v for k, v in node.items() if k != "storage_options"}
            return {k: v for key, value in items.items() for k, v in walk(value, f"{prefix}{key}.").items()}
        if isinstance(node, list) and any(isinstance(v, dict) for v in node):
            return {k: v for i, value in enumerate(node) for k, v in walk(value, f"{prefix}{i}.").items()}
        return {prefix.rstrip("."): json.dumps(node) if isinstance(node, list) else node}

    return walk(spec.to_dict(), "")


class TensorBoardSink:
    """Scalars under their metric names (`loss`, `aux/load_balance`, …), x = optimizer step.
    tensorboardX writes the event files without TensorFlow or the TensorBoard server installed."""

    def __init__(self, folder: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(folder), flush_secs=5)

    def __call__(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])
        if (text := samples_text(record)) is not None:
            self.writer.add_text("eval/samples", text, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run in `<run dir>/wandb`: offline unless $WANDB_MODE says otherwise (no account or
    network needed to train; `wandb sync <run dir>/wandb/offline-run-*` uploads it later)."""

    def __init__(self, spec: RunSpec, run: RunDir, run_id: str | None):
        import wandb

        self.table = wandb.Table
        self.run = wandb.init(
            mode=os.environ.get("WANDB_MODE") or "offline",
            dir=str(run.root),
            project=spec.output.project or os.environ.get("WANDB_PROJECT") or "zeroray",
            name=run.root.name,
            id=run_id,
            resume="allow",
            config=spec_params(spec),
            # console="off": W&B would otherwise wrap stdout/stderr, which carry our progress lines.
            # No system metrics: they would describe the driver's machine, not the workers'.
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        self.id = self.run.id

    def __call__(self, record: dict) -> None:
        data: dict = scalars(record)
        if record.get("eval/samples"):
            data["eval/samples"] = self.table(columns=["prompt", "text"],
                                              data=[[s["prompt"], s["text"]] for s in record["eval/samples"]])
        self.run.log(data, step=record["step"])

    def close(self) -> None:
        self.run.finish()


_MLFLOW_KEY = re.compile(r"[^\w\-. /:]")  # the characters MLflow accepts in a metric name


class MlflowSink:
    """An MLflow run through its client (no global "active run": one process may launch several
    runs). The default store is `file:<run dir>/mlruns`; `mlflow ui --backend-store-uri` shows it."""

    def __init__(self, spec: RunSpec, run: RunDir, run_id: str | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = spec.output.mlflow_uri or f"file:{run.root / 'mlruns'}"
        if uri.startswith("file:"):
            # MLflow 3.7+ refuses its file store unless asked (it favours a database, which needs
            # SQLAlchemy, absent from mlflow-skinny); a store inside the run directory is what we want.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None and self._continued(run_id):
            self.id = run_id
            return
        name = spec.output.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "zeroray"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.id = self.client.create_run(experiment_id, run_name=run.root.name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in spec_params(spec).items()]  # MLflow caps values at 6000
        for i in range(0, len(params), 100):  # and a batch at 100 parameters
            self.client.log_batch(self.id, params=params[i : i + 100])

    def _continued(self, run_id: str) -> bool:
        """Continue the run of an earlier launch, if this store holds it (mlflow_uri may have changed)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException:
            return False
        return True

    def __call__(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(record.get("time", time.time()) * 1000)
        metrics = [Metric(_MLFLOW_KEY.sub("_", k), float(v), now, record["step"]) for k, v in scalars(record).items()]
        self.client.log_batch(self.id, metrics=metrics)
        if (text := samples_text(record)) is not None:
            self.client.log_text(self.id, text, f"samples/step_{record['step']:08d}.md")

    def close(self) -> None:
        self.client.set_terminated(self.id)


class Trackers:
    """The configured sinks behind one callable (Progress's `sinks`). A sink that raises is
    logged once and dropped; the others go on, and so does training."""

    def __init__(self, sinks: dict[str, object]):
        self.sinks = sinks

    def __call__(self, record: dict) -> None:
        for name, sink in list(self.sinks.items()):
            try:
                sink(record)
            except Exception as exc:  # any failure of a third-party tracker; training must go on
                log.warning("tracker %s failed at step %s and is switched off for this launch: %s: %s",
                            name, record.get("step"), type(exc).__name__, exc)
                self._close(name)

    def _close(self, name: str) -> None:
        sink = self.sinks.pop(name)
        try:
            sink.close()
        except Exception as exc:  # closing a broken tracker may fail too
            log.warning("tracker %s did not close cleanly: %s: %s", name, type(exc).__name__, exc)

    def close(self) -> None:
        for name in list(self.sinks):
            self._close(name)


def open_trackers(spec: RunSpec, run: RunDir) -> Trackers:
    """The trackers of `output.trackers`. A tracker whose package is missing is a configuration
    error (raised before anything starts); one that fails to start is logged and left out."""
    ids_file = run.root / IDS_FILE
    ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
    sinks = {}
    for name in spec.output.trackers:
        if name != "tensorboard" and importlib.util.find_spec(name) is None:  # the package is the tracker's name
            raise ZerorayError(
                f"output.trackers lists {name}, but the {name} package is not installed: `pip install {name}`, "
                f"or remove {name} from output.trackers"
            )
        try:
            if name == "tensorboard":
                sinks[name] = TensorBoardSink(run.tensorboard)
            elif name == "wandb":
                sinks[name] = WandbSink(spec, run, ids.get(name))
            else:
                sinks[name] = MlflowSink(spec, run, ids.get(name))
        except Exception as exc:  # a tracker's own start-up problem: training goes on without it
            log.warning("tracker %s could not start and is left out: %s: %s", name, type(exc).__name__, exc)
    kept = {name: sink.id for name, sink in sinks.items() if name != "tensorboard"}
    if kept != {k: v for k, v in ids.items() if k in kept}:
        ids_file.write_text(json.dumps({**ids, **kept}) + "\n")
    return Trackers(sinks)
